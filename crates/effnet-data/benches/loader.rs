//! One epoch of the training input pipeline on a prepared dataset: Parquet row groups by ranged
//! read → decode → RandomResizedCrop(224) → flip → normalise into batches, one JSON line out.
//! The Python twin is benches/python_loader.py; scripts/bench-loader.sh runs both.
//!
//! Environment: LOADER_BENCH_URL (dataset), LOADER_THREADS (decode threads, 1), LOADER_BATCH (64),
//! LOADER_PASSES (2).

use std::time::Instant;

use effnet_data::loader::{BatchLoader, LoaderOptions, Transform};
use effnet_data::plan::{EpochPlan, initial_cursors};
use effnet_data::reader::{Dataset, RankReader};
use effnet_vision::{TrainConfig, TrainTransform};

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let url = std::env::var("LOADER_BENCH_URL").expect("LOADER_BENCH_URL names a prepared dataset");
    let threads: usize = setting("LOADER_THREADS", 1);
    let batch_size: usize = setting("LOADER_BATCH", 64);
    let passes: u64 = setting("LOADER_PASSES", 2);
    // I/O and Parquet decoding run on one runtime thread; image work on `threads` decode threads.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async {
        let dataset = Dataset::open(&url).await.expect("dataset");
        let transform = Transform::Train(TrainTransform::new(TrainConfig::imagenet(224)).unwrap());
        let mut best = 0.0f64;
        let mut images = 0;
        for epoch in 0..passes {
            let plan = EpochPlan::new(0, epoch, dataset.row_groups(), 1).unwrap();
            let reader = RankReader::new(dataset.clone(), plan.ranks[0].clone(), initial_cursors(&plan)[0].clone(), 1024, 4)
                .await
                .unwrap();
            let options = LoaderOptions { batch_size, threads, seed: 0, epoch };
            let mut loader = BatchLoader::new(reader, transform.clone(), options).unwrap();
            let start = Instant::now();
            images = 0;
            while let Some(batch) = loader.next_batch().await.unwrap() {
                images += batch.labels.len();
            }
            best = best.max(images as f64 / start.elapsed().as_secs_f64());
        }
        println!(
            "{{\"impl\":\"effnet\",\"threads\":{threads},\"batch\":{batch_size},\"images\":{images},\"images_per_s\":{best:.1},\"images_per_s_per_worker\":{:.1}}}",
            best / threads as f64
        );
    });
}
