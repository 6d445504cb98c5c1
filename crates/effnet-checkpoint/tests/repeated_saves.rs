//! Many saves to a local directory leave nothing behind: no open file, no resident memory that
//! grows save by save (each file passes through aligned buffers allocated per file, and threads
//! started per file), no temporary file. Its own test binary, so no other test's allocations move
//! the process's resident memory.

use bytes::Bytes;
use effnet_checkpoint::CheckpointStore;

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf only reads system configuration.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_saves_leak_no_file_and_no_memory() {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let store = CheckpointStore::new(effnet_store::open(dir.path().to_str().unwrap()).unwrap());
    // A file over the writer's 8 MiB piece (two buffers), one under it, and a small one.
    let files = vec![
        ("model.safetensors".to_string(), Bytes::from(vec![7u8; 12 << 20])),
        ("ema.safetensors".to_string(), Bytes::from(vec![8u8; 3 << 20])),
        ("state.json".to_string(), Bytes::from_static(b"{\"step\": 0}")),
    ];
    let mut measured = Vec::new();
    for step in 1..=100u64 {
        store.save(step, None, files.clone()).await.unwrap();
        store.purge(2, 0).await.unwrap();
        if step == 20 || step == 100 {
            measured.push((open_files(), resident_bytes()));
        }
    }
    let [(files_at_20, resident_at_20), (files_at_100, resident_at_100)] = measured[..] else {
        unreachable!()
    };
    assert_eq!(files_at_100, files_at_20, "open files after 20 saves and after 100");
    let growth = resident_at_100 as i64 - resident_at_20 as i64;
    assert!(growth < 4 << 20, "resident memory grew {growth} bytes from save 20 to save 100");
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["step-00000099", "step-00000100"]);
    let (committed, loaded) = store.latest().await.unwrap().unwrap();
    assert_eq!(committed.step, 100);
    assert_eq!(loaded["model.safetensors"], files[0].1);
}
