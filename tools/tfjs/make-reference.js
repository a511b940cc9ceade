// Computes the golden outputs of the nsfwjs Keras models with TF.js.
//
// For each model under DATA_DIR/models/nsfwjs/ and each photo, this script
// decodes the JPEG with libjpeg-turbo's djpeg (default settings, PPM output),
// resizes it with tf.image.resizeBilinear(alignCorners = true), divides by
// 255 and runs the model with @tensorflow/tfjs 4.22.0 on its pure JavaScript
// CPU backend. It writes, per model and photo, the class probabilities and
// the top-1 class, plus the size and byte sum of the decoded pixels, so a
// test can tell a decoder mismatch from a model mismatch.
//
// Usage: node make-reference.js DATA_DIR OUT_JSON IMAGE.jpg...
// The models are read from local files only (no network).
'use strict';

const fs = require('fs');
const path = require('path');
const { execFileSync, spawnSync } = require('child_process');
const tf = require('@tensorflow/tfjs');

const CLASSES = ['Drawing', 'Hentai', 'Neutral', 'Porn', 'Sexy'];
const MODELS = ['mobilenet_v2', 'inception_v3'];

// Parses a binary PPM (P6) or PGM (P5) with maxval 255 into {height, width,
// channels, pixels}. A gray image keeps one channel.
function parsePnm(buf, what) {
  let pos = 0;
  const fields = [];
  while (fields.length < 4) {
    while (pos < buf.length && /\s/.test(String.fromCharCode(buf[pos]))) pos++;
    if (buf[pos] === 0x23) { // a comment runs to the end of the line
      while (pos < buf.length && buf[pos] !== 0x0a) pos++;
      continue;
    }
    const start = pos;
    while (pos < buf.length && !/\s/.test(String.fromCharCode(buf[pos]))) pos++;
    fields.push(buf.toString('latin1', start, pos));
  }
  pos++; // the single whitespace byte after maxval
  const [magic, w, h, maxval] = fields;
  let channels = 0;
  if (magic === 'P6') channels = 3;
  if (magic === 'P5') channels = 1;
  if (!channels || maxval !== '255') throw new Error(`${what}: unsupported PNM header ${fields}`);
  const width = Number(w), height = Number(h);
  const pixels = buf.subarray(pos, pos + width * height * channels);
  if (pixels.length !== width * height * channels) throw new Error(`${what}: truncated PNM`);
  return { height, width, channels, pixels };
}

function decodeJpeg(file) {
  const ppm = execFileSync('djpeg', [file], { maxBuffer: 1 << 30 });
  return parsePnm(ppm, file);
}

// djpeg -version prints to stderr.
function djpegVersion() {
  const r = spawnSync('djpeg', ['-version'], { encoding: 'utf8' });
  return `djpeg: ${(r.stderr + r.stdout).trim()}`;
}

function loadModelFiles(dir) {
  const model = JSON.parse(fs.readFileSync(path.join(dir, 'model.json'), 'utf8'));
  const weightSpecs = [];
  const buffers = [];
  for (const group of model.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const p of group.paths) buffers.push(fs.readFileSync(path.join(dir, p)));
  }
  const all = Buffer.concat(buffers);
  const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.length);
  return tf.io.fromMemory({ modelTopology: model.modelTopology, weightSpecs, weightData });
}

// Returns the (N, H, W, 3) float32 batch of the images resized to size x size.
function makeBatch(images, size) {
  return tf.tidy(() => tf.stack(images.map((img) => {
    let t = tf.tensor3d(Uint8Array.from(img.pixels), [img.height, img.width, img.channels], 'int32');
    if (img.channels === 1) t = tf.tile(t, [1, 1, 3]);
    const resized = tf.image.resizeBilinear(t.toFloat(), [size, size], true);
    return resized.div(255);
  })));
}

async function main() {
  if (process.argv.length < 5) {
    console.error('usage: node make-reference.js DATA_DIR OUT_JSON IMAGE.jpg...');
    process.exit(1);
  }
  const dataDir = process.argv[2];
  const outFile = process.argv[3];
  const files = process.argv.slice(4);
  await tf.setBackend('cpu');

  const images = files.map((file) => {
    const img = decodeJpeg(file);
    let sum = 0;
    for (const b of img.pixels) sum += b;
    return { file, ...img, sum };
  });

  const out = {
    generator: 'tools/tfjs/make-reference.js',
    tfjs_version: tf.version.tfjs,
    backend: tf.getBackend(),
    decoder: djpegVersion(),
    preprocess: 'djpeg RGB, resizeBilinear alignCorners=true, /255',
    classes: CLASSES,
    image_dir: '/usr/share/darknet/data (Debian package darknet)',
    images: images.map((img) => ({
      name: path.basename(img.file), height: img.height, width: img.width,
      channels: img.channels, pixel_sum: img.sum,
    })),
    models: {},
  };

  for (const name of MODELS) {
    const model = await tf.loadLayersModel(loadModelFiles(path.join(dataDir, 'models', 'nsfwjs', name)));
    const [, height, width] = model.inputs[0].shape;
    if (height !== width) throw new Error(`${name}: non-square input ${height}x${width}`);
    const batch = makeBatch(images, height);
    const probs = await model.predict(batch).array();
    batch.dispose();
    out.models[name] = {
      input_size: height,
      results: images.map((img, i) => {
        const p = probs[i];
        const top = p.indexOf(Math.max(...p));
        return { image: path.basename(img.file), probabilities: p, top1: CLASSES[top] };
      }),
    };
    for (const r of out.models[name].results)
      console.log(`${name} ${r.image}: ${r.top1} ${r.probabilities.map((v) => v.toFixed(6)).join(' ')}`);
    model.dispose();
  }

  fs.writeFileSync(outFile, JSON.stringify(out, null, 2) + '\n');
  console.log(`wrote ${outFile}`);
}

main().catch((e) => {
  console.error(`make-reference.js: ${e.stack || e}`);
  process.exit(1);
});
