'use strict';
// The real @actions/cache client, called the way actions/cache v5.0.5 calls it:
//
//   node --require preload.js driver.js restore --path P [--path P2] --key K
//        [--restore-key R]... [--lookup-only] [--enable-cross-os-archive] [--result-file F]
//   node --require preload.js driver.js save --path P --key K [--upload-chunk-size N]
//        [--enable-cross-os-archive] [--result-file F]
//
// restore calls restoreCache(paths, key, restoreKeys, {lookupOnly}, enableCrossOsArchive) as
// src/restoreImpl.ts does; save calls saveCache(paths, key, {uploadChunkSize},
// enableCrossOsArchive) as src/saveImpl.ts does. What the action does around those calls
// (inputs, outputs, state, fail-on-cache-miss, "Cache save failed.") stays in the emulator;
// what has to live in the client's process does not: save.ts's uncaughtException handler, and
// exiting as soon as the call returns (the dist entry points pass earlyExit, since a dangling
// retry or progress timer would keep node alive).
//
// The client's own output (@actions/core's info lines and ::debug::, ::warning::, ::error::,
// ::add-mask:: commands) goes to stdout as in the action. The result is one JSON line, last on
// stdout or into --result-file: {"op", "matchedKey" | "cacheId"} or {"op", "error": {"name",
// "message"}} for what the call threw.
//
// The package comes from $INCSTORE_ACTIONS_CACHE_DIR (a node_modules directory) when set, else
// from a node_modules directory beside this file (where the emulator installs it in a job).

const fs = require('fs');
const path = require('path');
const {createRequire} = require('module');

function usage(message) {
  process.stderr.write(`driver.js: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const [op, ...rest] = argv;
  if (op !== 'restore' && op !== 'save') {
    usage('the first argument is restore or save');
  }
  const opts = {op, paths: [], restoreKeys: [], lookupOnly: false, crossOs: false};
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i];
    const value = () => {
      if (i + 1 >= rest.length) {
        usage(`${arg} needs a value`);
      }
      return rest[++i];
    };
    switch (arg) {
      case '--path': opts.paths.push(value()); break;
      case '--key': opts.key = value(); break;
      case '--restore-key': opts.restoreKeys.push(value()); break;
      case '--lookup-only': opts.lookupOnly = true; break;
      case '--enable-cross-os-archive': opts.crossOs = true; break;
      case '--upload-chunk-size': opts.uploadChunkSize = Number(value()); break;
      case '--result-file': opts.resultFile = value(); break;
      default: usage(`unknown argument ${arg}`);
    }
  }
  if (opts.key === undefined) {
    usage('--key is required');
  }
  return opts;
}

function loader() {
  const modules = process.env.INCSTORE_ACTIONS_CACHE_DIR;
  // resolve as a file directly inside the directory holding node_modules would
  const base = modules ? path.dirname(path.resolve(modules)) : __dirname;
  return createRequire(path.join(base, 'driver.js'));
}

function finish(opts, result) {
  const line = JSON.stringify(result) + '\n';
  if (opts.resultFile) {
    fs.writeFileSync(opts.resultFile, line);
  } else {
    process.stdout.write(line);
  }
  process.exit(0);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const load = loader();
  const cache = load('@actions/cache');
  const core = load('@actions/core');
  try {
    if (opts.op === 'restore') {
      const matchedKey = await cache.restoreCache(
        opts.paths, opts.key, opts.restoreKeys, {lookupOnly: opts.lookupOnly}, opts.crossOs);
      finish(opts, {op: 'restore', matchedKey: matchedKey === undefined ? null : matchedKey});
    } else {
      // save.ts: an exception escaping an upload callback warns instead of failing the step
      process.on('uncaughtException', e => core.info(`[warning]${e.message}`));
      const cacheId = await cache.saveCache(
        opts.paths, opts.key, {uploadChunkSize: opts.uploadChunkSize}, opts.crossOs);
      finish(opts, {op: 'save', cacheId});
    }
  } catch (error) {
    const name = error && error.name ? error.name : 'Error';
    const message = error && error.message !== undefined ? error.message : String(error);
    finish(opts, {op: opts.op, error: {name, message}});
  }
}

main();
