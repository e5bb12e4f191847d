// The runner's JavaScript half, evaluated once when the engine starts (before the
// snapshot, when the component is pre-initialised). It is a function of the host
// functions the Rust half provides and returns the kit that the Rust half drives:
//
//   parse(text)        -> [source, args] | string (what is wrong with the input)
//   start(fn, args)    -> Promise<string>: the JSON text of the awaited result
//   seed(a, b, c, d)   reseeds Math.random for this run (the snapshot would otherwise
//                      replay one sequence in every run)
//   nextTimer()        -> milliseconds until the earliest timer is due, or -1
//   fireTimers()       runs the timers that are due
//   describe(value)    -> text for an uncaught error: message and stack
(function (writeStderr) {
  'use strict';

  // --- console: everything goes to stderr, since stdout is the result -------------

  function inspect(value, nested) {
    switch (typeof value) {
      case 'string':
        return nested ? JSON.stringify(value) : value;
      case 'undefined':
        return 'undefined';
      case 'function':
        return '[Function ' + (value.name || '(anonymous)') + ']';
      case 'symbol':
        return value.toString();
      case 'bigint':
        return value + 'n';
      case 'object':
        if (value === null) return 'null';
        if (value instanceof Error) return describe(value);
        if (value instanceof Map) {
          return 'Map(' + value.size + ') {' +
            Array.from(value, ([k, v]) => ' ' + inspect(k, true) + ' => ' + inspect(v, true)).join(',') + ' }';
        }
        if (value instanceof Set) {
          return 'Set(' + value.size + ') {' + Array.from(value, (v) => ' ' + inspect(v, true)).join(',') + ' }';
        }
        try {
          const text = JSON.stringify(value);
          if (text !== undefined) return text;
        } catch (_) {
          // cyclic or holding a BigInt: fall through
        }
        return String(value);
      default:
        return String(value);
    }
  }

  function line(args) {
    return args.map((a) => inspect(a, false)).join(' ') + '\n';
  }

  const counts = new Map();
  const timers_ = new Map();
  const console = {
    log: (...args) => writeStderr(line(args)),
    info: (...args) => writeStderr(line(args)),
    debug: (...args) => writeStderr(line(args)),
    warn: (...args) => writeStderr(line(args)),
    error: (...args) => writeStderr(line(args)),
    trace: (...args) => writeStderr(line(['Trace:', ...args]) + new Error().stack.split('\n').slice(1).join('\n') + '\n'),
    assert: (ok, ...args) => {
      if (!ok) writeStderr(line(['Assertion failed' + (args.length ? ':' : ''), ...args]));
    },
    count: (label = 'default') => {
      const n = (counts.get(label) || 0) + 1;
      counts.set(label, n);
      writeStderr(label + ': ' + n + '\n');
    },
    time: (label = 'default') => {
      timers_.set(label, Date.now());
    },
    timeEnd: (label = 'default') => {
      const t = timers_.get(label);
      if (t !== undefined) {
        timers_.delete(label);
        writeStderr(label + ': ' + (Date.now() - t) + 'ms\n');
      }
    },
  };
  Object.defineProperty(globalThis, 'console', { value: console, writable: true, configurable: true });

  // --- timers: the Rust half sleeps until the next one is due -----------------------

  let timerSeq = 0;
  const timers = new Map(); // id -> { at, fn, args, every }

  function addTimer(fn, ms, args, repeat) {
    if (typeof fn !== 'function') throw new TypeError('the callback must be a function');
    const delay = Math.max(0, Number(ms) || 0);
    const id = ++timerSeq;
    timers.set(id, { at: Date.now() + delay, fn, args, every: repeat ? Math.max(1, delay) : null });
    return id;
  }
  function clearTimer(id) {
    timers.delete(id);
  }
  const define = (name, value) =>
    Object.defineProperty(globalThis, name, { value, writable: true, configurable: true });
  define('setTimeout', (fn, ms, ...args) => addTimer(fn, ms, args, false));
  define('setInterval', (fn, ms, ...args) => addTimer(fn, ms, args, true));
  define('clearTimeout', clearTimer);
  define('clearInterval', clearTimer);
  // An exception in a microtask ends the run, as it ends a Node process: it rejects
  // the run's promise (`start`).
  let failRun = null;
  define('queueMicrotask', (fn) => {
    if (typeof fn !== 'function') throw new TypeError('the callback must be a function');
    Promise.resolve().then(fn).catch((e) => {
      if (failRun !== null) failRun(e);
    });
  });

  function nextTimer() {
    let at = Infinity;
    for (const t of timers.values()) if (t.at < at) at = t.at;
    return at === Infinity ? -1 : Math.max(0, at - Date.now());
  }

  function fireTimers() {
    const now = Date.now();
    const due = [];
    for (const [id, t] of timers) if (t.at <= now) due.push([id, t]);
    due.sort((x, y) => x[1].at - y[1].at || x[0] - y[0]);
    for (const [id, t] of due) {
      if (!timers.has(id)) continue; // cleared by an earlier callback
      if (t.every === null) timers.delete(id);
      else t.at = now + t.every;
      t.fn(...t.args);
    }
  }

  // --- Math.random: xoshiro128**, reseeded from WASI's random source every run ----

  let s0 = 1, s1 = 2, s2 = 3, s3 = 4;
  function next32() {
    const result = Math.imul(((Math.imul(s1, 5) << 7) | (Math.imul(s1, 5) >>> 25)), 9) >>> 0;
    const t = s1 << 9;
    s2 ^= s0;
    s3 ^= s1;
    s1 ^= s2;
    s0 ^= s3;
    s2 ^= t;
    s3 = (s3 << 11) | (s3 >>> 21);
    return result;
  }
  function seed(a, b, c, d) {
    s0 = a | 0; s1 = b | 0; s2 = c | 0; s3 = d | 0;
    if ((s0 | s1 | s2 | s3) === 0) s0 = 1;
  }
  Object.defineProperty(Math, 'random', {
    value: function random() {
      // 53 random bits, as V8 and SpiderMonkey give.
      return ((next32() >>> 5) * 67108864 + (next32() >>> 6)) / 9007199254740992;
    },
    writable: true,
    configurable: true,
  });

  // --- the job ---------------------------------------------------------------------

  function parse(text) {
    let input;
    try {
      input = JSON.parse(text);
    } catch (e) {
      return 'stdin is not JSON (' + e.message + '); expected {"source": "<function expression>", "args": [...]}';
    }
    if (input === null || typeof input !== 'object' || Array.isArray(input)) {
      return 'stdin must be a JSON object {"source": "<function expression>", "args": [...]}';
    }
    if (typeof input.source !== 'string') {
      return '`source` must be a string holding a JavaScript function expression';
    }
    const args = input.args === undefined ? [] : input.args;
    if (!Array.isArray(args)) return '`args` must be an array';
    return [input.source, args];
  }

  function start(fn, args) {
    // An async wrapper turns a synchronous throw into a rejection too, so the Rust half
    // has one way of learning the outcome.
    const run = (async () => {
      const value = await fn(...args);
      const text = JSON.stringify(value);
      return text === undefined ? 'null' : text;
    })();
    return new Promise((resolve, reject) => {
      failRun = reject;
      run.then(resolve, reject);
    });
  }

  function describe(error) {
    if (error instanceof Error) {
      let text = error.name + ': ' + error.message;
      if (typeof error.stack === 'string') {
        // The frames of this file (the runner's own calls) say nothing to the user.
        const frames = error.stack.split('\n').filter((l) => l !== '' && !l.includes('(bootstrap.js:'));
        if (frames.length > 0) text += '\n' + frames.join('\n');
      }
      if (error.cause !== undefined) text += '\nCaused by: ' + inspect(error.cause, false);
      return text;
    }
    return inspect(error, true);
  }

  return { parse, start, seed, nextTimer, fireTimers, describe };
})
