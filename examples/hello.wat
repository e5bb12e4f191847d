;; The example function of `cloudpipe up`: a WASI preview1 module that prints
;; "hello, NAME!" with NAME its first argument ("world" without one).
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 3)
  ;; 0: greeting, 8: default name, 16: ending; 32: one iovec; 96: bytes written;
  ;; 100: argc; 104: size of the argument strings; 128: argv pointers;
  ;; 1024: argv strings (up to 60000 bytes); 65536: the output line.
  (data (i32.const 0) "hello, ")
  (data (i32.const 8) "world")
  (data (i32.const 16) "!\n")
  (func $strlen (param $p i32) (result i32)
    (local $n i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $next)))
    (local.get $n))
  (func (export "_start")
    (local $name i32)
    (local $len i32)
    (local $out i32)
    (local $left i32)
    (local.set $name (i32.const 8))
    (local.set $len (i32.const 5))
    (drop (call $args_sizes_get (i32.const 100) (i32.const 104)))
    ;; Use argv[1] only when all arguments fit the space set aside for them.
    (if (i32.and
          (i32.and (i32.ge_u (i32.load (i32.const 100)) (i32.const 2))
                   (i32.le_u (i32.load (i32.const 100)) (i32.const 200)))
          (i32.le_u (i32.load (i32.const 104)) (i32.const 60000)))
      (then
        (if (i32.eqz (call $args_get (i32.const 128) (i32.const 1024)))
          (then
            (local.set $name (i32.load (i32.const 132)))
            (local.set $len (call $strlen (local.get $name)))))))
    ;; The line in one buffer: "hello, " NAME "!\n".
    (memory.copy (i32.const 65536) (i32.const 0) (i32.const 7))
    (memory.copy (i32.const 65543) (local.get $name) (local.get $len))
    (memory.copy (i32.add (i32.const 65543) (local.get $len)) (i32.const 16) (i32.const 2))
    (local.set $out (i32.const 65536))
    (local.set $left (i32.add (local.get $len) (i32.const 9)))
    ;; fd_write may write less than asked: write until done or an error.
    (block $done
      (loop $more
        (i32.store (i32.const 32) (local.get $out))
        (i32.store (i32.const 36) (local.get $left))
        (br_if $done (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 96)))
        (local.set $out (i32.add (local.get $out) (i32.load (i32.const 96))))
        (local.set $left (i32.sub (local.get $left) (i32.load (i32.const 96))))
        (br_if $done (i32.eqz (i32.load (i32.const 96))))
        (br_if $more (i32.gt_s (local.get $left) (i32.const 0)))))))
