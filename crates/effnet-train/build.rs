// Test binaries of this crate load libtorch; give them the rpath so `cargo test` needs no
// LD_LIBRARY_PATH. Also compile the C++ shim against the same libtorch headers torch-sys uses:
// csrc/amp.cpp (autocast with a dtype, channels_last) and csrc/autograd.cpp (autograd functions
// calling back into Rust, post-accumulate-grad hooks, CUDA allocator statistics).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/amp.cpp");
    println!("cargo:rerun-if-changed=csrc/autograd.cpp");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports its libtorch lib directory");
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    let root = PathBuf::from(&lib).parent().expect("libtorch root").to_path_buf();
    cc::Build::new()
        .cpp(true)
        .file("csrc/amp.cpp")
        .file("csrc/autograd.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("effnet_amp");
}
