// Checks a TF.js layers model that topiary exported, with TF.js itself.
//
// A case folder (written by `build/tests/test_tfjs_export --export DIR`)
// contains tfjs/model.json and its shard, input.bin (a float32 (N, H, W, C)
// batch) and expected.json: the source model.json, topiary's output
// probabilities for the batch, and how each weight was changed
// ({"kind": "pruned", "threshold": t} or {"kind": "modified"}; weights not
// listed are unchanged). With @tensorflow/tfjs 4.22.0 on its pure JavaScript
// CPU backend, this script loads the export with tf.loadLayersModel and the
// source model next to it, and checks that:
//   - every manifest weight is float32 without quantization and is a weight
//     of the loaded model;
//   - in each pruned weight, the elements whose source magnitude is at most
//     the threshold are exactly 0, and the others equal the source values;
//   - unchanged weights equal the source values, and modified ones differ;
//   - the export's predictions on input.bin match topiary's to the stated
//     tolerance (max absolute difference per probability), with the same
//     top-1 class, and differ from the source model's by at least
//     min_dense_difference, so the comparison can see the pruning.
// Source values are the decoded weights of the source model as TF.js loads
// them (for uint8 weights: q * scale + min rounded to float32).
//
// Usage: node check-export.js CASE_DIR
//        node check-export.js --engine-layout WEIGHT MODEL_DIR
// The second form rewrites one float32 weight of MODEL_DIR's shard in
// topiary's engine layout, (K, C, R, S) for a conv kernel, (C*M, 1, R, S)
// for a depthwise kernel and (OUT, IN) for a dense kernel, which is the
// export bug that the first form must detect.
// Prints "ok NAME" or "FAIL NAME" per check and "N passed, M failed"; exits
// 1 if a check failed and 2 on a usage or file error.
'use strict';

const fs = require('fs');
const path = require('path');
const tf = require('@tensorflow/tfjs');

let passed = 0;
let failed = 0;

function check(name, ok, detail) {
  if (ok) {
    passed++;
    console.log(`ok   ${name}`);
  } else {
    failed++;
    console.log(`FAIL ${name}`);
    if (detail) console.log(`  ${detail}`);
  }
}

function fail(message) {
  console.error(`check-export.js: ${message}`);
  process.exit(2);
}

// Reads a model.json and its shards into the handler tf.loadLayersModel takes.
function readModel(modelJson) {
  const model = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
  const dir = path.dirname(modelJson);
  const weightSpecs = [];
  const buffers = [];
  for (const group of model.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const p of group.paths) buffers.push(fs.readFileSync(path.join(dir, p)));
  }
  const all = Buffer.concat(buffers);
  const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.length);
  return { model, handler: tf.io.fromMemory({ modelTopology: model.modelTopology, weightSpecs, weightData }) };
}

// Maps each weight's manifest name to its values in a loaded model.
function weightValues(model) {
  const out = new Map();
  for (const v of model.weights) out.set(v.originalName, v.read().dataSync());
  return out;
}

function numel(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

// Returns a list of problems of one weight, empty if it is as expected.
function weightProblems(name, kind, got, src) {
  if (!src) return [`${name}: not in the source model`];
  if (got.length !== src.length) return [`${name}: ${got.length} elements, source has ${src.length}`];
  let bad = 0;
  let first = -1;
  if (kind && kind.kind === 'pruned') {
    const threshold = Math.fround(kind.threshold);
    for (let i = 0; i < got.length; i++) {
      const want = Math.abs(src[i]) <= threshold ? 0 : src[i];
      if (got[i] !== want && bad++ === 0) first = i;
    }
  } else if (kind && kind.kind === 'modified') {
    let same = 0;
    for (let i = 0; i < got.length; i++) if (got[i] === src[i]) same++;
    return same === got.length ? [`${name}: the modified values equal the source values`] : [];
  } else {
    for (let i = 0; i < got.length; i++) if (got[i] !== src[i] && bad++ === 0) first = i;
  }
  if (!bad) return [];
  return [`${name}: ${bad} of ${got.length} elements differ, first at ${first} (${got[first]}, source ${src[first]})`];
}

function checkManifest(exported, loaded) {
  const entries = exported.weightsManifest.flatMap((g) => g.weights);
  const notFloat = entries.filter((e) => e.dtype !== 'float32' || e.quantization);
  check('manifest weights are float32 without quantization', notFloat.length === 0,
    notFloat.slice(0, 3).map((e) => e.name).join(', '));
  const missing = entries.filter((e) => !loaded.has(e.name));
  check('every manifest weight is a weight of the loaded model',
    missing.length === 0 && loaded.size === entries.length,
    `missing: ${missing.slice(0, 3).map((e) => e.name).join(', ')}; ${loaded.size} model weights, ${entries.length} manifest entries`);
  return entries;
}

function checkWeights(entries, kinds, loaded, source) {
  const groups = { pruned: [], modified: [], unchanged: [] };
  let zeros = 0;
  for (const e of entries) {
    const kind = kinds[e.name];
    const group = kind ? kind.kind : 'unchanged';
    if (!groups[group]) fail(`expected.json: weight ${e.name} has unknown kind ${group}`);
    const got = loaded.get(e.name);
    if (!got) continue;
    if (group === 'pruned') for (const v of got) zeros += v === 0 ? 1 : 0;
    groups[group].push(...weightProblems(e.name, kind, got, source.get(e.name)));
  }
  const count = (k) => entries.filter((e) => (kinds[e.name] ? kinds[e.name].kind : 'unchanged') === k).length;
  check(`pruned weights are 0 exactly at the pruned elements and the source values elsewhere (${count('pruned')} weights, ${zeros} zeros)`,
    groups.pruned.length === 0 && count('pruned') > 0, groups.pruned.slice(0, 5).join('\n  '));
  check(`modified statistics differ from the source (${count('modified')} weights)`,
    groups.modified.length === 0 && count('modified') > 0, groups.modified.slice(0, 5).join('\n  '));
  check(`unchanged weights equal the source (${count('unchanged')} weights)`,
    groups.unchanged.length === 0, groups.unchanged.slice(0, 5).join('\n  '));
}

function maxDifference(a, b) {
  let max = 0;
  for (let i = 0; i < a.length; i++)
    for (let k = 0; k < a[i].length; k++) max = Math.max(max, Math.abs(a[i][k] - b[i][k]));
  return max;
}

function argmax(row) {
  return row.indexOf(Math.max(...row));
}

async function checkPredictions(dir, expected, model, dense) {
  const shape = expected.input.shape;
  const bytes = fs.readFileSync(path.join(dir, expected.input.file));
  if (bytes.length !== numel(shape) * 4) fail(`${expected.input.file}: ${bytes.length} bytes, expected ${numel(shape) * 4}`);
  const data = new Float32Array(numel(shape));
  for (let i = 0; i < data.length; i++) data[i] = bytes.readFloatLE(4 * i);
  const x = tf.tensor4d(data, shape);
  const got = await model.predict(x).array();
  const base = await dense.predict(x).array();
  x.dispose();
  const want = expected.probabilities;
  const diff = maxDifference(got, want);
  check(`TF.js predictions match topiary's (max difference ${diff.toExponential(2)}, tolerance ${expected.tolerance})`,
    got.length === want.length && diff <= expected.tolerance);
  const top = got.map(argmax).join(',');
  check('TF.js and topiary agree on the top-1 class of each input', top === want.map(argmax).join(','),
    `TF.js ${top}, topiary ${want.map(argmax).join(',')}`);
  const moved = maxDifference(base, want);
  check(`pruning changed the predictions (max difference to the source model ${moved.toExponential(2)})`,
    moved >= expected.min_dense_difference, `expected at least ${expected.min_dense_difference}`);
}

async function checkCase(dir) {
  await tf.setBackend('cpu');
  const expected = JSON.parse(fs.readFileSync(path.join(dir, 'expected.json'), 'utf8'));
  const exported = readModel(path.join(dir, expected.model));
  const source = readModel(expected.source_model);
  let model = null;
  try {
    model = await tf.loadLayersModel(exported.handler);
  } catch (e) {
    check('tf.loadLayersModel loads the export', false, String(e));
  }
  if (model) {
    check('tf.loadLayersModel loads the export', true);
    const dense = await tf.loadLayersModel(source.handler);
    const loaded = weightValues(model);
    const entries = checkManifest(exported.model, loaded);
    checkWeights(entries, expected.weights, loaded, weightValues(dense));
    await checkPredictions(dir, expected, model, dense);
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

// Rewrites weight `name` of the model in modelDir in the engine layout.
function writeEngineLayout(name, modelDir) {
  const jsonPath = path.join(modelDir, 'model.json');
  const model = JSON.parse(fs.readFileSync(jsonPath, 'utf8'));
  if (model.weightsManifest.length !== 1 || model.weightsManifest[0].paths.length !== 1) fail(`${jsonPath}: expected one shard`);
  const shardPath = path.join(modelDir, model.weightsManifest[0].paths[0]);
  const shard = fs.readFileSync(shardPath);
  let offset = 0;
  for (const e of model.weightsManifest[0].weights) {
    if (e.dtype !== 'float32' || e.quantization) fail(`${e.name}: not float32`);
    const n = numel(e.shape);
    if (e.name === name) {
      const src = new Float32Array(n);
      for (let i = 0; i < n; i++) src[i] = shard.readFloatLE(offset + 4 * i);
      const dst = toEngine(src, e.shape, name.endsWith('depthwise_kernel'));
      for (let i = 0; i < n; i++) shard.writeFloatLE(dst[i], offset + 4 * i);
      fs.writeFileSync(shardPath, shard);
      console.log(`rewrote ${name} ${JSON.stringify(e.shape)} in the engine layout`);
      return;
    }
    offset += 4 * n;
  }
  fail(`${jsonPath}: no weight ${name}`);
}

// (R, S, C, K) -> (K, C, R, S); depthwise (R, S, C, M) -> (C*M, 1, R, S);
// (IN, OUT) -> (OUT, IN).
function toEngine(src, shape, depthwise) {
  const dst = new Float32Array(src.length);
  if (shape.length === 2) {
    const [n, m] = shape;
    for (let i = 0; i < n; i++) for (let o = 0; o < m; o++) dst[o * n + i] = src[i * m + o];
    return dst;
  }
  if (shape.length !== 4) fail(`shape ${JSON.stringify(shape)} has no engine layout`);
  const [R, S, C, K] = shape;
  for (let r = 0; r < R; r++)
    for (let s = 0; s < S; s++)
      for (let c = 0; c < C; c++)
        for (let k = 0; k < K; k++) {
          const to = depthwise ? ((c * K + k) * R + r) * S + s : ((k * C + c) * R + r) * S + s;
          dst[to] = src[((r * S + s) * C + c) * K + k];
        }
  return dst;
}

const args = process.argv.slice(2);
if (args[0] === '--engine-layout' && args.length === 3) {
  writeEngineLayout(args[1], args[2]);
} else if (args.length === 1) {
  checkCase(args[0]).catch((e) => fail(e.stack || String(e)));
} else {
  fail('usage: node check-export.js CASE_DIR | --engine-layout WEIGHT MODEL_DIR');
}
