//! Where a CNI request's time goes: the handler marks each step, and the time since the
//! previous mark is sent back with the answer (the plugin prints it when asked, for the CNI
//! benchmark's breakdown). Marks outside a request are ignored. Steps that ran beside the
//! handler's own (in a task of their own) are recorded under `ALONGSIDE` + their name: they
//! overlap the others and do not add up with them.

use std::cell::RefCell;
use std::future::Future;
use std::time::Instant;

struct Steps {
    last: Instant,
    list: Vec<(String, u64)>,
}

tokio::task_local! {
    static STEPS: RefCell<Steps>;
}

/// The step `name` ends now.
pub fn mark(name: &str) {
    let _ = STEPS.try_with(|s| {
        let mut s = s.borrow_mut();
        let now = Instant::now();
        let us = now.duration_since(s.last).as_micros() as u64;
        s.last = now;
        s.list.push((name.to_string(), us));
    });
}

/// What names a step that ran beside the others.
pub const ALONGSIDE: &str = "(alongside) ";

/// A step that ran beside the handler's own for `us` µs (timed where it ran).
pub fn alongside(name: &str, us: u64) {
    let _ = STEPS.try_with(|s| s.borrow_mut().list.push((format!("{ALONGSIDE}{name}"), us)));
}

/// Run `f` recording its steps (µs each).
pub async fn recorded<F: Future>(f: F) -> (F::Output, Vec<(String, u64)>) {
    STEPS
        .scope(RefCell::new(Steps { last: Instant::now(), list: Vec::new() }), async {
            let out = f.await;
            let list = STEPS.with(|s| std::mem::take(&mut s.borrow_mut().list));
            (out, list)
        })
        .await
}
