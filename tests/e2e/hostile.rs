//! Hostile guests end with the right status while the server keeps serving others.

use cloudpipe_test_programs_artifacts as programs;
use serde_json::json;

use crate::server::{TestServer, peak_rss_mib, program};

#[tokio::test]
async fn hostile_guests_get_the_right_status_while_others_are_served() {
    // The server's peak RSS is measured: no JS runner compiling beside the guests.
    let s = TestServer::start(&["--no-runner-js"]).await;
    for (name, path) in [
        ("loop", programs::LOOP_FOREVER),
        ("bomb", programs::MEMORY_BOMB),
        ("recursion", programs::RECURSION),
        ("flood", programs::FLOOD),
        ("exit3", programs::EXIT_WITH_CODE),
        ("procexit", programs::PROC_EXIT),
        ("echo", programs::ECHO),
    ] {
        s.upload(name, &program(path)).await;
    }
    let hostile = [
        json!({"function": "loop", "timeout_ms": 500}),
        json!({"function": "bomb", "memory_mb": 64}),
        json!({"function": "recursion"}),
        json!({"function": "flood", "args": ["200"]}),
        json!({"function": "exit3"}),
        json!({"function": "procexit"}),
    ];
    let runs = hostile.into_iter().map(|spec| s.run(spec));
    let well_behaved = async {
        // The server keeps answering while the hostile jobs run.
        let mut n = 0;
        for _ in 0..20 {
            let job = s.run(json!({"function": "echo", "stdin": "ok"})).await;
            assert_eq!(job["status"], "succeeded", "{job}");
            n += 1;
        }
        n
    };
    let (results, served) = tokio::join!(futures::future::join_all(runs), well_behaved);
    assert_eq!(served, 20);
    let [lp, bomb, rec, flood, exit3, procexit] = <[_; 6]>::try_from(results).unwrap();

    assert_eq!(lp["status"], "timed_out", "{lp}");
    assert_eq!(lp["error"]["kind"], "timeout");
    let run_ms = lp["run_ms"].as_f64().unwrap();
    // Stopped at its time, give or take the scheduling of a loaded 2-core machine.
    assert!((500.0..900.0).contains(&run_ms), "timeout of 500 ms took {run_ms} ms");

    assert_eq!(bomb["status"], "failed", "{bomb}");
    assert_eq!(bomb["error"]["kind"], "memory_limit", "{bomb}");

    assert_eq!(rec["status"], "failed", "{rec}");
    assert_eq!(rec["error"]["kind"], "trap", "{rec}");
    assert!(rec["error"]["message"].as_str().unwrap().contains("wasm backtrace"), "{rec}");

    assert_eq!(flood["status"], "succeeded", "{}", flood["error"]);
    assert_eq!(flood["stdout_truncated"], true);
    assert_eq!(flood["stdout"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(flood["stderr"], "done\n");

    for job in [exit3, procexit] {
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["exit_code"], 3, "{job}");
    }
    // 200 MB went through stdout; the server kept at most the cap of it.
    let peak = peak_rss_mib(s.pid());
    assert!(peak < 150, "server peak RSS {peak} MiB");
}
