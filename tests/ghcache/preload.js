'use strict';
// A --require preload for the @actions/cache client under test: host names under
// .blob.core.windows.net resolve to 127.0.0.1, where tests/ghcache/service.py serves the blob
// storage behind its signed URLs. The URLs must keep an Azure host name, or the client would
// not take its Azure SDK path; patching the resolver inside this one process is what keeps
// /etc/hosts (and every other process on the machine) untouched.
//
// Node's net module calls dns.lookup through the module object at connect time, so replacing
// the property is enough for both node:http (the Azure SDK) and @actions/http-client.

const dns = require('dns');

const BLOB_DOMAIN = '.blob.core.windows.net';
const LOOPBACK = '127.0.0.1';
const realLookup = dns.lookup;

dns.lookup = function lookup(hostname, options, callback) {
  if (typeof options === 'function') {
    callback = options;
    options = {};
  } else if (typeof options === 'number') {
    options = {family: options};
  }
  const name = typeof hostname === 'string' ? hostname.toLowerCase().replace(/\.$/, '') : '';
  if (!name.endsWith(BLOB_DOMAIN)) {
    return realLookup.call(this, hostname, options, callback);
  }
  // all: true is what net asks for when it races address families (autoSelectFamily)
  process.nextTick(() => {
    if (options && options.all) {
      callback(null, [{address: LOOPBACK, family: 4}]);
    } else {
      callback(null, LOOPBACK, 4);
    }
  });
  return {};
};
