// Validate one glTF/GLB file with the Khronos glTF-Validator; prints the JSON report's issues.
// Usage: node validate.js FILE.glb   (exit 0 when the report has no errors)
const fs = require("fs");
const validator = require("gltf-validator");

const path = process.argv[2];
const asset = new Uint8Array(fs.readFileSync(path));
validator
  .validateBytes(asset, { uri: path, maxIssues: 100 })
  .then((report) => {
    console.log(JSON.stringify(report.issues));
    process.exit(report.issues.numErrors === 0 ? 0 : 1);
  })
  .catch((error) => {
    console.error(String(error));
    process.exit(2);
  });
