;; A core module with `_start` that imports something outside WASI preview1.
(module
  (import "env" "launch_rockets" (func $launch))
  (memory (export "memory") 1)
  (func (export "_start") (call $launch)))
