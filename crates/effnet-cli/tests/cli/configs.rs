//! Every shipped ImageNet recipe, `configs/b0.yaml` … `configs/b7.yaml`, trains on the CPU: two
//! steps of two images from a small ImageNet-style dataset (JPEGs of several sizes in class
//! folders, through `effnet prepare --from image-folder`), at the config's own resolution,
//! dropout, drop path, RandAugment and precision (bf16). The files are used as shipped; only
//! where and how long they run changes, through `--set`.

use std::path::Path;
use std::time::Instant;

use effnet_config::{JobSpec, Precision};
use image::codecs::jpeg::JpegEncoder;
use serde_json::Value;

use crate::common::{effnet, workspace_root};

/// (width, height) of the images of each class: sizes around ImageNet's, none already at a
/// variant's resolution, landscape and portrait, so every crop and resize path is taken.
const SIZES: [(u32, u32); 4] = [(500, 375), (333, 500), (700, 560), (640, 640)];
const CLASSES: [&str; 3] = ["n01440764", "n01443537", "n01484850"];

/// The published (resolution, dropout) of B0 … B7 (Tan & Le 2019, Table 1 and the reference code).
const PUBLISHED: [(u64, f64); 8] =
    [(224, 0.2), (240, 0.2), (260, 0.3), (300, 0.3), (380, 0.4), (456, 0.4), (528, 0.5), (600, 0.5)];

/// An image folder of `CLASSES.len() × SIZES.len()` smooth colour JPEGs, different per class.
fn image_folder(root: &Path) {
    for (label, class) in CLASSES.iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for (index, &(width, height)) in SIZES.iter().enumerate() {
            let image = image::RgbImage::from_fn(width, height, |x, y| {
                let (u, v) = (x as f32 / width as f32, y as f32 / height as f32);
                let wave = ((u * (3 + label) as f32 + v * (2 + index) as f32) * std::f32::consts::PI).sin();
                image::Rgb([
                    (255.0 * u) as u8,
                    (127.5 + 127.0 * wave) as u8,
                    (255.0 * v * (label + 1) as f32 / CLASSES.len() as f32) as u8,
                ])
            });
            let mut bytes = Vec::new();
            JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&image).unwrap();
            std::fs::write(dir.join(format!("{class}_{index}.JPEG")), bytes).unwrap();
        }
    }
}

fn metrics(job_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(job_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_shipped_variant_trains_two_bf16_steps_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(&dir.path().join("images"));
    let data = dir.path().join("data").display().to_string();
    let images = dir.path().join("images").display().to_string();
    let prepared =
        effnet(&["prepare", "--from", "image-folder", &images, "--out", &data, "--rows-per-group", "4"]);
    assert_eq!(prepared.code, 0, "{}", prepared.stderr);

    let mut timings = Vec::new();
    for (variant, &(resolution, dropout)) in PUBLISHED.iter().enumerate() {
        let config = workspace_root().join(format!("configs/b{variant}.yaml"));
        let shipped = JobSpec::load(&config).unwrap_or_else(|error| panic!("{error}"));
        // The recipe's own settings, which the run must keep.
        assert_eq!(shipped.training.precision, Precision::Bf16, "{}", config.display());
        assert_eq!((u64::from(shipped.model.resolution()), shipped.model.dropout()), (resolution, dropout));
        let rand_augment =
            shipped.data.augmentation.rand_augment.clone().expect("the recipe uses RandAugment");
        // The class count is the dataset's: the configs leave model.classes to the manifest.
        assert_eq!(shipped.model.classes, None, "{}", config.display());

        let job_dir = dir.path().join(format!("b{variant}"));
        let settings = [
            "distributed.device=cpu".to_owned(),
            "distributed.workers=1".to_owned(),
            "distributed.backend=local".to_owned(),
            format!("data.train={data}"),
            // No evaluation: the recipe's validation set is unset.
            "data.val=~".to_owned(),
            "data.batch_size=2".to_owned(),
            "data.loader_threads=1".to_owned(),
            "training.epochs=~".to_owned(),
            "training.steps=2".to_owned(),
            // Only the final checkpoint, which the trainer always writes.
            "checkpoint.at_epoch_end=false".to_owned(),
            format!("job_dir={}", job_dir.display()),
        ];
        let mut args =
            vec!["run".to_owned(), config.display().to_string(), "--progress".into(), "never".into()];
        for setting in &settings {
            args.extend(["--set".to_owned(), setting.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let outcome = effnet(&args);
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("b{variant} at {resolution}x{resolution}: {seconds:.1} s");
        timings.push((variant, seconds));
        assert_eq!(outcome.code, 0, "b{variant}: {}", outcome.stderr);

        // The spec the run trained: the recipe's model and augmentation in bf16, on the CPU.
        let job = read_json(&job_dir.join("job.json"));
        let spec = &job["spec"];
        assert_eq!(spec["model"]["variant"], format!("b{variant}"), "{spec}");
        assert_eq!(spec["training"]["precision"], "bf16", "{spec}");
        assert_eq!(spec["distributed"]["device"], "cpu", "{spec}");
        assert_eq!(spec["model"]["drop_path"]["rate"].as_f64(), Some(shipped.model.drop_path.rate), "{spec}");
        let augment = &spec["data"]["augmentation"]["rand_augment"];
        assert_eq!((augment["ops"].as_u64(), augment["magnitude"].as_f64()), (Some(2), Some(9.0)), "{spec}");
        assert_eq!((rand_augment.ops, rand_augment.magnitude), (2, 9.0));

        let summary = read_json(&job_dir.join("summary.json"));
        let plan = &summary["plan"];
        assert_eq!(plan["resolution"].as_u64(), Some(resolution), "{plan}");
        assert_eq!(plan["dropout"].as_f64(), Some(dropout), "{plan}");
        assert_eq!(plan["model"]["classes"].as_u64(), Some(CLASSES.len() as u64), "{plan}");
        assert_eq!(
            (summary["steps"].as_u64(), plan["global_batch"].as_u64()),
            (Some(2), Some(2)),
            "{summary}"
        );

        let records = metrics(&job_dir);
        let steps: Vec<&Value> = records.iter().filter(|r| r["type"] == "step").collect();
        assert_eq!(steps.len(), 2, "b{variant}: {records:?}");
        for step in &steps {
            let loss = step["loss"].as_f64().expect("a loss");
            assert!(loss.is_finite() && loss > 0.0, "b{variant}: {step}");
            assert_eq!(step["samples"], 2, "{step}");
        }
        let start = records.iter().find(|r| r["type"] == "start").expect("a start record");
        assert_eq!(start["device"], "Cpu", "{start}");
    }
    let total: f64 = timings.iter().map(|(_, seconds)| seconds).sum();
    let lines: Vec<String> =
        timings.iter().map(|(variant, seconds)| format!("b{variant} {seconds:.1} s")).collect();
    eprintln!("all configs: {} = {total:.1} s", lines.join(", "));
}
