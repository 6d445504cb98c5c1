//! Forward + backward time of one training step (no optimiser), printed as one JSON line.
//! The PyTorch-eager twin is benches/pytorch_fwd_bwd.py; scripts/bench-model.sh runs both.
//!
//! Environment: BENCH_VARIANT (b0), BENCH_RESOLUTION (224), BENCH_BATCH (8), BENCH_THREADS (2),
//! BENCH_WARMUP (3), BENCH_STEPS (10).

use std::time::Instant;

use effnet_model::{EfficientNet, EfficientNetConfig, Variant};
use tch::{Device, Kind, Tensor, nn, nn::ModuleT};

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let variant: Variant = setting("BENCH_VARIANT", Variant::B0);
    let resolution: i64 = setting("BENCH_RESOLUTION", 224);
    let batch: i64 = setting("BENCH_BATCH", 8);
    let threads: i32 = setting("BENCH_THREADS", 2);
    let warmup: usize = setting("BENCH_WARMUP", 3);
    let steps: usize = setting("BENCH_STEPS", 10);

    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = EfficientNet::new(&vs.root(), &EfficientNetConfig::named(variant)).expect("model");
    let images = Tensor::randn([batch, 3, resolution, resolution], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(1000, [batch], (Kind::Int64, Device::Cpu));

    let step = || {
        for mut variable in vs.trainable_variables() {
            variable.zero_grad();
        }
        let loss = model.forward_t(&images, true).cross_entropy_for_logits(&labels);
        loss.backward();
    };
    for _ in 0..warmup {
        step();
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = Instant::now();
        step();
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{{\"impl\":\"effnet\",\"variant\":\"{variant}\",\"resolution\":{resolution},\"batch\":{batch},\"threads\":{threads},\"steps\":{steps},\"median_ms\":{:.2},\"images_per_s\":{:.2}}}",
        median * 1e3,
        batch as f64 / median
    );
}
