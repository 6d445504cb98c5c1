//! Stochastic depth: the pure function's statistics and the model's per-block wiring.

use effnet_model::{EfficientNet, EfficientNetConfig, Error, Variant, stochastic_depth};
use tch::{Device, Kind, Tensor, nn, nn::ModuleT};

const ROWS: i64 = 40_000;

/// libtorch's generator is process-global and tests run on parallel threads: tests that seed
/// it and expect repeatable draws hold this lock.
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ones() -> Tensor {
    Tensor::ones([ROWS, 3, 2, 2], (Kind::Float, Device::Cpu))
}

#[test]
fn empirical_drop_rate_and_mean_match_p() {
    let _rng = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(11);
    for p in [0.1, 0.2, 0.5, 0.8] {
        let out = stochastic_depth(&ones(), p, true).unwrap();
        // Per sample: every element of a row is dropped together (row mode).
        let per_row_min = out.amin([1, 2, 3], false);
        let per_row_max = out.amax([1, 2, 3], false);
        assert!(per_row_min.equal(&per_row_max), "a row was partially dropped at p={p}");
        let dropped = per_row_max.eq(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        let sigma = (p * (1.0 - p) / ROWS as f64).sqrt();
        assert!((dropped - p).abs() < 4.0 * sigma, "p={p}: dropped {dropped}");
        // Survivors are scaled by exactly 1/(1-p).
        let survivors = per_row_max.masked_select(&per_row_max.gt(0.0));
        let scale = 1.0 / (1.0 - p);
        let worst = (survivors - scale).abs().max().double_value(&[]);
        assert!(worst < 1e-6 * scale, "p={p}: survivor scale off by {worst}");
        // The mean is preserved: E = 1, sd of the mean = sqrt(p/(1-p)/N).
        let mean = out.mean(Kind::Double).double_value(&[]);
        let mean_sigma = (p / (1.0 - p) / ROWS as f64).sqrt();
        assert!((mean - 1.0).abs() < 4.0 * mean_sigma, "p={p}: mean {mean}");
    }
}

#[test]
fn identity_at_eval_and_at_zero() {
    let input = Tensor::randn([64, 8, 4, 4], (Kind::Float, Device::Cpu));
    assert!(stochastic_depth(&input, 0.5, false).unwrap().equal(&input));
    assert!(stochastic_depth(&input, 0.0, true).unwrap().equal(&input));
    let all_dropped = stochastic_depth(&input, 1.0, true).unwrap();
    assert_eq!(all_dropped.abs().sum(Kind::Float).double_value(&[]), 0.0);
}

#[test]
fn invalid_probability_names_the_value() {
    let input = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
    for p in [-0.1, 1.5, f64::NAN] {
        let err = stochastic_depth(&input, p, true).unwrap_err();
        assert!(matches!(err, Error::InvalidDropPathProbability { .. }));
        assert!(err.to_string().contains(&format!("{p}")), "{err}");
    }
}

fn build(config: &EfficientNetConfig) -> (nn::VarStore, EfficientNet) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = EfficientNet::new(&vs.root(), config).unwrap();
    (vs, model)
}

#[test]
fn only_blocks_with_identity_skip_drop_and_rates_are_linear() {
    let (_vs, model) = build(&EfficientNetConfig::named(Variant::B2).with_drop_path_rate(0.3));
    let count = model.blocks().count() as f64;
    let mut with_skip = 0;
    for (index, block) in model.blocks().enumerate() {
        let config = block.config;
        assert_eq!(
            block.drop_path.is_some(),
            config.stride == 1 && config.in_channels == config.out_channels
        );
        if let Some(drop_path) = &block.drop_path {
            with_skip += 1;
            let expected = 0.3 * index as f64 / count;
            assert!((drop_path.effective_rate() - expected).abs() < 1e-12, "block {index}");
        }
    }
    // B2: 23 blocks, the first of each of the 7 stages has no skip.
    assert_eq!((count as usize, with_skip), (23, 16));
}

#[test]
fn multiplier_scales_every_block() {
    let (_vs, model) = build(&EfficientNetConfig::named(Variant::B0));
    // B0's last block (192 -> 320) has no skip; the last one with a skip is block 14 of 16.
    let last = model.blocks().filter_map(|b| b.drop_path.as_ref()).last().unwrap();
    let full = last.effective_rate();
    assert!((full - 0.2 * 14.0 / 16.0).abs() < 1e-12, "{full}");
    model.set_drop_path_multiplier(0.25).unwrap();
    assert!((last.effective_rate() - full * 0.25).abs() < 1e-12);
    assert!(model.blocks().filter_map(|b| b.drop_path.as_ref()).all(|d| d.effective_rate() <= 0.05));
    let err = model.set_drop_path_multiplier(-1.0).unwrap_err();
    assert!(err.to_string().contains("-1"), "{err}");
    assert_eq!(model.drop_path_multiplier(), 0.25);
}

#[test]
fn model_forward_uses_drop_path_only_in_training() {
    let _rng = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    // Dropout off so drop path is the only randomness; BatchNorm in train mode is deterministic.
    let config = EfficientNetConfig::named(Variant::B0)
        .with_classes(4)
        .with_input_channels(1)
        .with_dropout(0.0)
        .with_drop_path_rate(0.9);
    let (_vs, model) = build(&config);
    let input = Tensor::randn([8, 1, 32, 32], (Kind::Float, Device::Cpu));

    model.set_drop_path_multiplier(0.0).unwrap();
    let a = model.forward_t(&input, true);
    let b = model.forward_t(&input, true);
    assert!(a.equal(&b), "multiplier 0 must disable drop path");

    model.set_drop_path_multiplier(1.0).unwrap();
    tch::manual_seed(1);
    let c = model.forward_t(&input, true);
    tch::manual_seed(2);
    let d = model.forward_t(&input, true);
    assert!(!c.equal(&d), "drop path at 0.9 must change training outputs");
    tch::manual_seed(1);
    let c_again = model.forward_t(&input, true);
    assert!(c.equal(&c_again), "seeded drop path must repeat");

    let e = model.forward_t(&input, false);
    let f = model.forward_t(&input, false);
    assert!(e.equal(&f), "eval must be deterministic");
}
