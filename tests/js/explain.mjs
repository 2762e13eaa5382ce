// Runs a compiled model in onnxruntime-node: `node explain.mjs MODEL INPUT.f32 D1,D2,... TARGET OUT.f32`.
// Reads the float32 input (raw little-endian), feeds `target` (-1: the predicted class), writes the relevance
// (raw float32) and prints {"explained_class": [...], "inputs": [...]} as JSON.
import {readFileSync, writeFileSync} from 'node:fs';
import * as ort from 'onnxruntime-node';

const [model, inputFile, dims, target, outFile] = process.argv.slice(2);
const shape = dims.split(',').map(Number);
const bytes = readFileSync(inputFile);
const data = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
const session = await ort.InferenceSession.create(model);
const [input] = session.inputNames.filter((name) => name !== 'target');
const out = await session.run({
  [input]: new ort.Tensor('float32', data, shape),
  target: new ort.Tensor('int64', new BigInt64Array(shape[0]).fill(BigInt(target)), [shape[0]]),
});
writeFileSync(outFile, Buffer.from(out.relevance.data.buffer, out.relevance.data.byteOffset, out.relevance.data.byteLength));
console.log(JSON.stringify({explained_class: Array.from(out.explained_class.data, Number), inputs: session.inputNames}));
