// `make build` must leave target/release/effnet runnable with no environment set: bake the
// libtorch folder (from torch-sys, a direct dependency for this metadata) into the rpath.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    }
    // rustc passes --as-needed, which drops libtorch_cuda (nothing references its symbols
    // directly) and CUDA is then never seen at run time. Only on CUDA installs: on the CPU-only
    // wheel set libtorch.so needs CUDA libraries that are absent.
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        // cudarc dlopens NCCL by the name `libnccl.so`; pip's wheel has only `libnccl.so.2`, so
        // bootstrap links one into `.venv/nccl` (next to `.venv/libtorch`), searched via RUNPATH.
        if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB")
            && let Some(venv) = std::path::Path::new(&lib).parent().and_then(|p| p.parent())
        {
            println!("cargo:rustc-link-arg=-Wl,-rpath={}", venv.join("nccl").display());
        }
    }
}
