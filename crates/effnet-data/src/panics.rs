//! Panics this crate catches on purpose and turns into errors.
//!
//! parquet-rs panics on some corrupt pages instead of returning an error; the reader catches
//! those ([`catching`]) and reports the file as corrupt. The `effnet` binary's panic hook ends the
//! process on any panic (a panic elsewhere is a bug), so it asks [`expected`] first: a panic
//! raised while this thread polls a [`catching`] future is the reader's to handle.

use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::task::Poll;

thread_local! {
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

/// True while this thread runs code whose panics a caller catches.
pub fn expected() -> bool {
    CATCHING.with(|depth| depth.get() > 0)
}

/// Marks this thread as catching until dropped (also when the poll it guards panics).
struct Catching;

impl Catching {
    fn enter() -> Catching {
        CATCHING.with(|depth| depth.set(depth.get() + 1));
        Catching
    }
}

impl Drop for Catching {
    fn drop(&mut self) {
        CATCHING.with(|depth| depth.set(depth.get().saturating_sub(1)));
    }
}

/// Run `future`, turning a panic while it is polled into `Err(payload)`. Each poll is marked
/// ([`expected`]) on the thread that runs it, which may change between polls.
///
/// ```
/// let caught = futures::executor::block_on(effnet_data::panics::catching(async { panic!("corrupt page") }));
/// assert!(caught.is_err());
/// ```
pub async fn catching<F: Future>(future: F) -> std::thread::Result<F::Output> {
    let mut future = Box::pin(future);
    std::future::poll_fn(move |context| {
        let _marked = Catching::enter();
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(context))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_holds_while_the_future_runs_and_is_gone_after_a_panic() {
        let inside = futures::executor::block_on(catching(async { expected() })).unwrap();
        assert!(inside);
        assert!(!expected());
        let caught = futures::executor::block_on(catching(async { panic!("corrupt page") }));
        assert_eq!(*caught.unwrap_err().downcast::<&str>().unwrap(), "corrupt page");
        assert!(!expected(), "the mark outlived the panic");
    }
}
