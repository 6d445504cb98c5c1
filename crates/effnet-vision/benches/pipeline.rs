//! Single-thread throughput of the per-sample pipelines on a directory of JPEGs.
//!
//! ```text
//! .venv/bin/python benches/make_jpeg_corpus.py --out /tmp/vision-corpus --count 2000 --seed 0
//! VISION_BENCH_DIR=/tmp/vision-corpus cargo bench -p effnet-vision --bench pipeline
//! ```
//!
//! Files are read into memory first; only decode + transform is timed, on one thread, over
//! `VISION_BENCH_PASSES` passes (default 3). Prints one JSON line per measured stage: the full train
//! transform (decode → RandomResizedCrop 224 → flip → normalise), and, for choosing decoders, full
//! decode with zune-jpeg and with jpeg-decoder, and jpeg-decoder at 1/2, 1/4 and 1/8 scale. The train
//! transform runs with and without DCT-domain downscaling; the difference shows on large photos.

use std::time::Instant;

use effnet_vision::{
    EvalConfig, EvalTransform, SampleRng, TrainConfig, TrainTransform, decode, decode_reduced,
};

fn main() {
    let Ok(dir) = std::env::var("VISION_BENCH_DIR") else {
        eprintln!("set VISION_BENCH_DIR to a directory of JPEGs (see benches/make_jpeg_corpus.py); skipping");
        return;
    };
    let passes: usize = std::env::var("VISION_BENCH_PASSES").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read VISION_BENCH_DIR {dir}: {e}"))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg" || e == "jpeg" || e == "png"))
        .collect();
    paths.sort();
    let blobs: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).expect("read image")).collect();
    assert!(!blobs.is_empty(), "no images in {dir}");
    let keys: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();

    let train = TrainTransform::new(TrainConfig::imagenet(224)).expect("config");
    let mut slot = vec![0f32; train.sample_len()];
    let mut checksum = 0f64;
    let stage = |name: &str, run: &mut dyn FnMut(usize, usize)| {
        for (i, _) in blobs.iter().enumerate().take(50) {
            run(0, i); // warm-up: caches, lazy CPU-feature detection, scratch buffers
        }
        let start = Instant::now();
        for pass in 0..passes {
            for i in 0..blobs.len() {
                run(pass + 1, i);
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let images = blobs.len() * passes;
        println!(
            "{{\"pipeline\":\"{name}\",\"files\":{},\"passes\":{passes},\"threads\":1,\"seconds\":{seconds:.3},\"images_per_s\":{:.1}}}",
            blobs.len(),
            images as f64 / seconds
        );
    };

    stage("rust train rrc224-flip-normalize", &mut |epoch, i| {
        let mut rng = SampleRng::new(0, epoch as u64, &keys[i]);
        train.apply(&blobs[i], &mut rng, &mut slot).expect("train transform");
        checksum += slot[0] as f64;
    });
    let mut exact_config = TrainConfig::imagenet(224);
    exact_config.dct_downscale = false;
    let train_exact = TrainTransform::new(exact_config).expect("config");
    stage("rust train rrc224-flip-normalize, no DCT downscale", &mut |epoch, i| {
        let mut rng = SampleRng::new(0, epoch as u64, &keys[i]);
        train_exact.apply(&blobs[i], &mut rng, &mut slot).expect("train transform");
        checksum += slot[0] as f64;
    });
    let eval = EvalTransform::new(EvalConfig::imagenet(224)).expect("config");
    stage("rust eval resize256-centre224-normalize", &mut |_, i| {
        eval.apply(&blobs[i], &mut slot).expect("eval transform");
        checksum += slot[0] as f64;
    });
    stage("decode zune-jpeg full", &mut |_, i| {
        checksum += decode(&blobs[i]).expect("decode").data[0] as f64;
    });
    for reduction in [2, 4, 8] {
        stage(&format!("decode jpeg-decoder 1/{reduction}"), &mut |_, i| {
            checksum += decode_reduced(&blobs[i], reduction).expect("decode").data[0] as f64;
        });
    }
    stage("decode jpeg-decoder full", &mut |_, i| {
        let mut decoder = jpeg_decoder::Decoder::new(&blobs[i][..]);
        checksum += decoder.decode().expect("decode")[0] as f64;
    });
    eprintln!("checksum {checksum:.3}");
}
