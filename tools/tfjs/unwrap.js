// Unwraps one nsfwjs model folder into a standard TF.js layers model.
//
// nsfwjs ships each model as CommonJS modules: model.min.js exports
// {modelTopology, weightsManifest} and each group1-shardNofM.min.js exports
// the shard's bytes as one base64 string. This script writes model.json
// (format "layers-model", every manifest path renamed to "<shard>.bin") and
// the decoded .bin shards into OUT_DIR. It checks that the manifest's tensor
// sizes add up to the shard bytes before writing anything.
//
// Usage: node unwrap.js SRC_DIR OUT_DIR
'use strict';

const fs = require('fs');
const path = require('path');

const DTYPE_BYTES = { float32: 4, int32: 4, bool: 1, float16: 2, uint8: 1, uint16: 2 };

function fail(message) {
  process.stderr.write(`unwrap.js: ${message}\n`);
  process.exit(1);
}

function tensorBytes(entry) {
  const numel = entry.shape.reduce((a, b) => a * b, 1);
  const dtype = entry.quantization ? entry.quantization.dtype : entry.dtype;
  const size = DTYPE_BYTES[dtype];
  if (!size) fail(`weight ${entry.name}: unsupported dtype ${dtype}`);
  return numel * size;
}

function main() {
  if (process.argv.length !== 4) fail('usage: node unwrap.js SRC_DIR OUT_DIR');
  const srcDir = path.resolve(process.argv[2]);
  const outDir = path.resolve(process.argv[3]);

  const wrapped = require(path.join(srcDir, 'model.min.js'));
  if (!wrapped.modelTopology || !Array.isArray(wrapped.weightsManifest))
    fail(`${srcDir}/model.min.js does not export {modelTopology, weightsManifest}`);

  const manifest = [];
  const shards = [];
  for (const group of wrapped.weightsManifest) {
    const paths = [];
    let groupBytes = 0;
    for (const p of group.paths) {
      const encoded = require(path.join(srcDir, `${p}.min.js`));
      if (typeof encoded !== 'string') fail(`${p}.min.js does not export a base64 string`);
      const bytes = Buffer.from(encoded, 'base64');
      shards.push({ file: `${p}.bin`, bytes });
      paths.push(`${p}.bin`);
      groupBytes += bytes.length;
    }
    const expected = group.weights.reduce((sum, w) => sum + tensorBytes(w), 0);
    if (expected !== groupBytes)
      fail(`manifest group ${group.paths[0]}: weights need ${expected} bytes, shards hold ${groupBytes}`);
    manifest.push({ paths, weights: group.weights });
  }

  const model = {
    format: 'layers-model',
    generatedBy: wrapped.modelTopology.keras_version
      ? `keras v${wrapped.modelTopology.keras_version}` : 'unknown',
    convertedBy: 'nsfwjs model.min.js, unwrapped by tools/tfjs/unwrap.js',
    modelTopology: wrapped.modelTopology,
    weightsManifest: manifest,
  };

  fs.mkdirSync(outDir, { recursive: true });
  for (const shard of shards) fs.writeFileSync(path.join(outDir, shard.file), shard.bytes);
  fs.writeFileSync(path.join(outDir, 'model.json'), JSON.stringify(model));
  const total = shards.reduce((sum, s) => sum + s.bytes.length, 0);
  console.log(`unwrapped ${srcDir} -> ${outDir}: model.json, ${shards.length} shard(s), ${total} bytes`);
}

main();
