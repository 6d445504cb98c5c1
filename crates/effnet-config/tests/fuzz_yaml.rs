//! Property tests and hostile documents for the job loader: mutated shipped configs, arbitrary
//! text, alias bombs and deep nesting. Each must give a spec or a `ConfigError`: never a panic,
//! a stack overflow, or an allocation beyond [`LARGEST_ALLOCATION`] (this binary's allocator
//! refuses one, which aborts the test loudly).
//!
//! Cases per property: 256 by default; `PROPTEST_CASES=100000 cargo test -p effnet-config --test
//! fuzz_yaml` for a long run. Failing inputs are saved next to this file
//! (`fuzz_yaml.proptest-regressions`) and replayed first on every later run.

use std::alloc::{GlobalAlloc, Layout, System};

use effnet_config::{JobSpec, Override};
use proptest::prelude::*;

/// A job spec is a few KB; anything near this is an expansion the loader should have refused.
const LARGEST_ALLOCATION: usize = 64 << 20;

struct CappedAllocator;

// SAFETY: forwards to the system allocator; refusing (null) is allowed by the GlobalAlloc contract.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LARGEST_ALLOCATION {
            std::ptr::null_mut()
        } else {
            unsafe { System.alloc(layout) }
        }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LARGEST_ALLOCATION {
            std::ptr::null_mut()
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LARGEST_ALLOCATION {
            std::ptr::null_mut()
        } else {
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

const SHIPPED: [&str; 3] = [
    include_str!("../../../configs/b0.yaml"),
    include_str!("../../../configs/fashion-mnist.yaml"),
    include_str!("../../../configs/b7.yaml"),
];

fn override_set() -> Vec<Override> {
    vec![Override::parse("data.batch_size=2").unwrap()]
}

/// Load with and without a `--set` (the override path builds its own tree of the document).
fn load_both(text: &str) -> [Result<JobSpec, String>; 2] {
    [
        JobSpec::from_yaml_str(text, "job.yaml").map_err(|e| e.to_string()),
        JobSpec::from_yaml_str_with_overrides(text, "job.yaml", &override_set()).map_err(|e| e.to_string()),
    ]
}

/// Nine levels of aliases, each ten copies of the one before: 10^9 leaves if expanded.
fn billion_laughs() -> String {
    let mut text = String::from("a0: &a0 [\"lol\"]\n");
    for level in 1..=9 {
        let previous = format!("*a{}", level - 1);
        text += &format!("a{level}: &a{level} [{}]\n", vec![previous; 10].join(", "));
    }
    text + "name: bomb\nmodel: {variant: b0}\ndata: {train: x}\n"
}

#[test]
fn an_alias_bomb_is_refused_without_expanding_it() {
    // serde-saphyr reads lazily and stops at the first unknown key, before expanding anything.
    let message = JobSpec::from_yaml_str(&billion_laughs(), "job.yaml")
        .expect_err("a billion-laughs document must not load")
        .to_string();
    assert!(message.starts_with("job.yaml:1:1: a0: unknown field"), "{message}");
}

#[test]
fn an_alias_bomb_with_a_set_is_refused_without_expanding_it() {
    // With `--set` the document is first built as a tree, which copied every alias: 23 GB resident,
    // then the kernel's OOM killer. Now the tree refuses it (see tree.rs's tests for its message)
    // and, as for any document the tree cannot take, the deserialiser's own error is reported.
    let message = JobSpec::from_yaml_str_with_overrides(&billion_laughs(), "job.yaml", &override_set())
        .expect_err("a billion-laughs document must not load")
        .to_string();
    assert!(message.starts_with("job.yaml:1:1: a0: unknown field"), "{message}");
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    for depth in [1_000, 100_000] {
        let text = format!("name: {}{}\n", "[".repeat(depth), "]".repeat(depth));
        for result in load_both(&text) {
            let message = result.expect_err("a deeply nested name is not a string");
            assert!(message.starts_with("job.yaml"), "{message}");
        }
    }
}

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config(256))]

    /// A shipped config with bytes overwritten (YAML syntax characters weighted up), cut short,
    /// or a line duplicated.
    #[test]
    fn mutated_shipped_configs_load_or_fail_with_a_located_error(
        which in 0usize..3,
        overwrites in prop::collection::vec(
            (0.0f64..1.0, prop_oneof![any::<u8>(), prop::sample::select(b":-[]{}&*!|>'\"#%@`,? \n\t0".to_vec())]),
            0..6,
        ),
        keep in prop_oneof![3 => Just(1.0), 1 => 0.0f64..1.0],
        duplicate in prop::option::of(0.0f64..1.0),
    ) {
        let mut bytes = SHIPPED[which].as_bytes().to_vec();
        let len = bytes.len();
        for (at, value) in overwrites {
            bytes[((at * len as f64) as usize).min(len - 1)] = value;
        }
        bytes.truncate((keep * len as f64).ceil() as usize);
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some(at) = duplicate {
            let lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let line = lines[((at * lines.len() as f64) as usize).min(lines.len() - 1)].to_string();
                text = format!("{text}\n{line}\n");
            }
        }
        for result in load_both(&text) {
            if let Err(message) = result {
                prop_assert!(message.starts_with("job.yaml") || message.starts_with("--set"), "{}", message);
                prop_assert!(!message.contains('\n'), "multi-line error: {}", message);
            }
        }
    }

    /// Arbitrary text, mostly YAML-ish.
    #[test]
    fn arbitrary_text_loads_or_fails(text in "[a-z_:{}\\[\\],&*!|>'\" \n0-9.-]{0,200}") {
        for spec in load_both(&text).into_iter().flatten() {
            prop_assert!(!spec.name.is_empty());
        }
    }
}
