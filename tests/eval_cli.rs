//! `pwself-engine eval ...` and `viz attention|neighbours` end to end through the binary:
//! hand-checkable answers from `.npy` features (SPEC.md section 7's known answers,
//! separable clusters), a checkpoint trained for two steps scored by every protocol (its
//! kNN checked against a naive weighted kNN over its exported features), the cache, the
//! pictures, and clean refusals of bad input.

use std::path::{Path, PathBuf};

mod common;

use common::{refused, run};
use pwself_engine::data::embedded::{default_pack, Split};
use pwself_engine::data::pack::PackWriter;
use pwself_engine::eval::npy;
use pwself_engine::train::TrainConfig;
use serde_json::{json, Value};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the binary, asserts success, parses stdout as JSON.
fn json_of(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn write_features(dir: &Path, name: &str, rows: &[Vec<f32>]) -> PathBuf {
    let p = dir.join(name);
    let cols = rows[0].len();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    npy::write_matrix(&p, &flat, rows.len(), cols).unwrap();
    p
}

fn write_labels(dir: &Path, name: &str, labels: &[u16]) -> PathBuf {
    let p = dir.join(name);
    npy::write_labels(&p, labels).unwrap();
    p
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-5
}

/// A unit vector at `deg` degrees in the plane.
fn at(deg: f32) -> Vec<f32> {
    let r = deg.to_radians();
    vec![r.cos(), r.sin()]
}

#[test]
fn knn_from_npy_matches_the_spec_example_and_separable_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // SPEC 7: train (1,0)->0, (0.8,0.6)->1, (0.6,0.8)->1; test (1,0) of class 0; k = 3.
    let tf = write_features(
        d,
        "tf.npy",
        &[vec![1.0, 0.0], vec![0.8, 0.6], vec![0.6, 0.8]],
    );
    let tl = write_labels(d, "tl.npy", &[0, 1, 1]);
    let qf = write_features(d, "qf.npy", &[vec![1.0, 0.0]]);
    let ql = write_labels(d, "ql.npy", &[0]);
    let base = [
        "eval",
        "knn",
        "--train-features",
        s(&tf),
        "--train-labels",
        s(&tl),
        "--test-features",
        s(&qf),
        "--test-labels",
        s(&ql),
        "--k",
        "3",
        "--json",
    ];
    let v = json_of(&base);
    assert_eq!(v["results"][0]["k"], 3);
    assert_eq!(v["results"][0]["top1"], 100.0, "T = 0.07 picks class 0");
    let mut t1 = base.to_vec();
    t1.extend(["--temperature", "1"]);
    assert_eq!(
        json_of(&t1)["results"][0]["top1"],
        0.0,
        "T = 1 picks class 1"
    );

    // Three separable clusters (scaled arbitrarily: kNN normalises): 100 % for every k.
    let mut train = Vec::new();
    let mut labels = Vec::new();
    for i in 0..60u16 {
        let c = i % 3;
        let mut v = vec![0.05 * f32::from(i % 7); 3];
        v[usize::from(c)] = 3.0 + f32::from(i % 5);
        train.push(v);
        labels.push(c);
    }
    let tf = write_features(d, "ctf.npy", &train);
    let tl = write_labels(d, "ctl.npy", &labels);
    let v = json_of(&[
        "eval",
        "knn",
        "--train-features",
        s(&tf),
        "--train-labels",
        s(&tl),
        "--test-features",
        s(&tf),
        "--test-labels",
        s(&tl),
        "--json",
    ]);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "k = 10, 20, 100, 200 by default");
    for r in results {
        assert_eq!(r["top1"], 100.0, "{r}");
    }
    // The table form names the protocol and every k.
    let out = run(&[
        "eval",
        "knn",
        "--train-features",
        s(&tf),
        "--train-labels",
        s(&tl),
        "--test-features",
        s(&tf),
        "--test-labels",
        s(&tl),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("weighted kNN") && text.contains("200"),
        "{text}"
    );
}

#[test]
fn linear_fast_on_separable_blobs_reaches_100_percent_and_says_its_mode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    for i in 0..120u32 {
        let c = (i % 4) as u16;
        // Blob centres 4 apart on the axes, jitter within +-0.5.
        let j = |k: u32| ((i * 7 + k * 13) % 11) as f32 / 10.0 - 0.5;
        let mut v = vec![j(0), j(1), j(2), j(3)];
        v[usize::from(c)] += 4.0;
        feats.push(v);
        labels.push(c);
    }
    let f = write_features(d, "f.npy", &feats);
    let l = write_labels(d, "l.npy", &labels);
    let v = json_of(&[
        "eval",
        "linear",
        "--train-features",
        s(&f),
        "--train-labels",
        s(&l),
        "--test-features",
        s(&f),
        "--test-labels",
        s(&l),
        "--epochs",
        "30",
        "--batch",
        "16",
        "--lr",
        "0.5",
        "--json",
    ]);
    assert_eq!(v["mode"], "fast");
    assert!(v["best_top1"].as_f64().unwrap() >= 99.0, "{v}");
    let out = run(&[
        "eval",
        "linear",
        "--train-features",
        s(&f),
        "--train-labels",
        s(&l),
        "--test-features",
        s(&f),
        "--test-labels",
        s(&l),
        "--epochs",
        "2",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("mode: fast"));
}

/// SPEC 7's protocol example: ranking [E, H, N, J, H] (easy {0}, hard {1, 4}, junk {3}).
#[test]
fn retrieval_and_copy_from_npy_reproduce_the_known_answers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Database rows at 0, 10, ..., 40 degrees from the query: the ranking is 0, 1, 2, 3, 4.
    let db = write_features(
        d,
        "db.npy",
        &(0..5).map(|i| at(10.0 * i as f32)).collect::<Vec<_>>(),
    );
    let q = write_features(d, "q.npy", &[at(-5.0)]);
    let gt = d.join("gt.json");
    std::fs::write(
        &gt,
        json!({"imlist": ["e", "h1", "n", "j", "h2"], "qimlist": ["q"],
               "gnd": [{"easy": [0], "hard": [1, 4], "junk": [3]}]})
        .to_string(),
    )
    .unwrap();
    let v = json_of(&[
        "eval",
        "retrieval",
        "--gt",
        s(&gt),
        "--db-features",
        s(&db),
        "--query-features",
        s(&q),
        "--json",
    ]);
    let scores = v["scores"].as_array().unwrap();
    let map = |name: &str| {
        scores
            .iter()
            .find(|x| x["protocol"] == name)
            .unwrap_or_else(|| panic!("no {name} in {v}"))
    };
    assert!(close(map("easy")["map"].as_f64().unwrap(), 1.0));
    assert!(close(map("medium")["map"].as_f64().unwrap(), 0.902778));
    assert!(close(map("hard")["map"].as_f64().unwrap(), 0.791667));
    let mp: Vec<f64> = map("medium")["mp_at"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .collect();
    assert!(
        close(mp[0], 1.0) && close(mp[1], 0.75) && close(mp[2], 0.75),
        "{mp:?}"
    );
    // One protocol only.
    let v = json_of(&[
        "eval",
        "retrieval",
        "--gt",
        s(&gt),
        "--db-features",
        s(&db),
        "--query-features",
        s(&q),
        "--protocol",
        "hard",
        "--json",
    ]);
    assert_eq!(v["scores"].as_array().unwrap().len(), 1);

    // Copy detection: database at 0, 20, 40, 60 degrees. Query a at 0 degrees with its
    // original db[1] (rank 1 -> AP 0.25), query b at 60 degrees with db[3] (rank 0 -> 1).
    let cdb = write_features(
        d,
        "cdb.npy",
        &(0..4).map(|i| at(20.0 * i as f32)).collect::<Vec<_>>(),
    );
    let cq = write_features(d, "cq.npy", &[at(0.0), at(60.0)]);
    let cgt = d.join("copy.json");
    std::fs::write(
        &cgt,
        json!({"db": ["o0.png", "o1.png", "o2.png", "o3.png"],
               "queries": [{"image": "a.png", "positives": [1], "block": "crop"},
                           {"image": "b.png", "positives": [3], "block": "jpeg"}]})
        .to_string(),
    )
    .unwrap();
    let v = json_of(&[
        "eval",
        "copy",
        "--gt",
        s(&cgt),
        "--db-features",
        s(&cdb),
        "--query-features",
        s(&cq),
        "--json",
    ]);
    assert!(close(v["map"].as_f64().unwrap(), 0.625), "{v}");
    assert_eq!(v["whitened"], false);
    let blocks = v["blocks"].as_array().unwrap();
    assert!(close(blocks[0]["map"].as_f64().unwrap(), 0.25) && blocks[0]["block"] == "crop");
    assert!(close(blocks[1]["map"].as_f64().unwrap(), 1.0));
}

#[test]
fn bad_npy_input_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f3 = write_features(d, "f3.npy", &[vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]]);
    let f4 = write_features(d, "f4.npy", &[vec![1.0, 0.0, 0.0, 0.0]]);
    let l2 = write_labels(d, "l2.npy", &[0, 1]);
    let l1 = write_labels(d, "l1.npy", &[0]);
    let knn = |tf: &Path, tl: &Path, qf: &Path, ql: &Path| {
        vec![
            "eval".to_string(),
            "knn".into(),
            "--train-features".into(),
            s(tf).into(),
            "--train-labels".into(),
            s(tl).into(),
            "--test-features".into(),
            s(qf).into(),
            "--test-labels".into(),
            s(ql).into(),
        ]
    };
    let args = knn(&f3, &l2, &f4, &l1);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&a, &["f4.npy", "4 wide", "f3.npy"]);
    let args = knn(&f3, &l1, &f3, &l2);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&a, &["l1.npy", "1 labels", "2 feature rows"]);
    refused(
        &["eval", "knn", "--train-features", s(&f3)],
        &["--train-labels", "missing"],
    );
    refused(
        &[
            "eval",
            "linear",
            "--train-features",
            s(&f3),
            "--train-labels",
            s(&l2),
            "--test-features",
            s(&f3),
            "--test-labels",
            s(&l2),
            "--mode",
            "augmented",
        ],
        &["--mode augmented", "--checkpoint"],
    );
    refused(
        &["eval", "knn", "--feature", "last0"],
        &["--feature", "last0"],
    );

    // Retrieval ground truth with an out-of-range index, and with no queries.
    let gt = d.join("gt.json");
    std::fs::write(
        &gt,
        json!({"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [5], "hard": [], "junk": []}]}).to_string(),
    )
    .unwrap();
    let q = write_features(d, "q.npy", &[vec![1.0, 0.0, 0.0]]);
    refused(
        &[
            "eval",
            "retrieval",
            "--gt",
            s(&gt),
            "--db-features",
            s(&f3),
            "--query-features",
            s(&q),
        ],
        &["gt.json", "gnd[0].easy[0]", "out of range"],
    );
    std::fs::write(
        &gt,
        json!({"imlist": ["a", "b"], "qimlist": [], "gnd": []}).to_string(),
    )
    .unwrap();
    refused(
        &[
            "eval",
            "retrieval",
            "--gt",
            s(&gt),
            "--db-features",
            s(&f3),
            "--query-features",
            s(&q),
        ],
        &["gt.json", "no queries"],
    );
    // Query features of another width than the database's.
    std::fs::write(
        &gt,
        json!({"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": []}]}).to_string(),
    )
    .unwrap();
    refused(
        &[
            "eval",
            "retrieval",
            "--gt",
            s(&gt),
            "--db-features",
            s(&f3),
            "--query-features",
            s(&f4),
        ],
        &["f4.npy", "4 wide"],
    );
    // Copy ground truth without queries; a positive out of range.
    let cgt = d.join("copy.json");
    std::fs::write(&cgt, json!({"db": ["a", "b"], "queries": []}).to_string()).unwrap();
    refused(
        &[
            "eval",
            "copy",
            "--gt",
            s(&cgt),
            "--db-features",
            s(&f3),
            "--query-features",
            s(&q),
        ],
        &["copy.json", "no queries"],
    );
    std::fs::write(
        &cgt,
        json!({"db": ["a", "b"], "queries": [{"image": "q", "positives": [7], "block": "x"}]})
            .to_string(),
    )
    .unwrap();
    refused(
        &[
            "eval",
            "copy",
            "--gt",
            s(&cgt),
            "--db-features",
            s(&f3),
            "--query-features",
            s(&q),
        ],
        &["copy.json", "queries[0].positives[0]"],
    );
    // Not a checkpoint.
    let junk = d.join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    refused(
        &[
            "eval",
            "knn",
            "--checkpoint",
            s(&junk),
            "--train",
            "x",
            "--test",
            "y",
        ],
        &["junk.safetensors"],
    );
}

/// Writes the first `n` images of an embedded split as a pack.
fn small_pack(path: &Path, split: Split, n: usize) {
    let src = default_pack(split).unwrap();
    let mut w = PackWriter::create(path, 28, 28, 1, src.class_names()).unwrap();
    for i in 0..n {
        w.push(src.image(i), src.label(i)).unwrap();
    }
    w.finish().unwrap();
}

/// Naive weighted kNN (SPEC 7) over rows of `dim`: top-1 accuracy in percent.
fn naive_knn(train: &[f32], tl: &[u16], test: &[f32], ql: &[u16], dim: usize, k: usize) -> f64 {
    let norm = |r: &[f32]| {
        let n = r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        r.iter().map(|v| f64::from(*v) / n).collect::<Vec<f64>>()
    };
    let tr: Vec<Vec<f64>> = train.chunks(dim).map(norm).collect();
    let mut hits = 0;
    for (q, &label) in test.chunks(dim).map(norm).zip(ql) {
        let mut sims: Vec<(f64, usize)> = tr
            .iter()
            .enumerate()
            .map(|(j, t)| (t.iter().zip(&q).map(|(a, b)| a * b).sum(), j))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut score = [0.0f64; 10];
        for &(sim, j) in &sims[..k] {
            score[usize::from(tl[j])] += (sim / 0.07).exp();
        }
        let best = (0..10).fold(0, |b, c| if score[c] > score[b] { c } else { b });
        hits += usize::from(best == usize::from(label));
    }
    100.0 * hits as f64 / ql.len() as f64
}

#[test]
fn a_trained_checkpoint_is_scored_by_every_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (train, test) = (d.join("train.pwpack"), d.join("test.pwpack"));
    small_pack(&train, Split::Train, 48);
    small_pack(&test, Split::Test, 24);
    // A two-step femto run: depth 2, small head, 2 + 2 views.
    let mut c = TrainConfig::default();
    c.model.depth = Some(2);
    c.views.local_views = Some(2);
    c.head.hidden = 32;
    c.head.bottleneck = 16;
    c.head.out_dim = 64;
    c.run.batch = 16;
    c.run.epochs = 1;
    c.optim.warmup_epochs = 0;
    let cfg = d.join("tiny.toml");
    std::fs::write(&cfg, toml::to_string(&c).unwrap()).unwrap();
    let run_dir = d.join("run");
    let out = run(&[
        "train",
        "--config",
        s(&cfg),
        "--data",
        s(&train),
        "--max-steps",
        "2",
        "--out",
        s(&run_dir),
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ckpt = run_dir.join("checkpoint.safetensors");

    // kNN from the checkpoint, twice: the second run reads the cache and agrees.
    let knn = [
        "eval",
        "knn",
        "--checkpoint",
        s(&run_dir),
        "--train",
        s(&train),
        "--test",
        s(&test),
        "--k",
        "1,5",
        "--json",
    ];
    let a = json_of(&knn);
    assert_eq!(a["source"]["feature"], "cls");
    assert_eq!(a["dim"], 64);
    assert!(run_dir.join(".feature-cache").is_dir());
    let cached = std::fs::read_dir(run_dir.join(".feature-cache"))
        .unwrap()
        .count();
    assert_eq!(cached, 4, "features + sidecar for train and test");
    let b = json_of(&knn);
    assert_eq!(a["results"], b["results"]);

    // The same features exported to .npy, scored through the .npy path and by a naive kNN.
    let ftr = d.join("train_feats.npy");
    let fte = d.join("test_feats.npy");
    for (pack, out) in [(&train, &ftr), (&test, &fte)] {
        let v = json_of(&[
            "eval",
            "features",
            "--checkpoint",
            s(&ckpt),
            "--pack",
            s(pack),
            "--out",
            s(out),
            "--json",
        ]);
        assert_eq!(v["files"][0]["cols"], 64);
    }
    let (tr, rows, dim) = npy::read_matrix(&ftr).unwrap();
    assert_eq!((rows, dim), (48, 64));
    let tl = npy::read_labels(&d.join("train_feats.labels.npy")).unwrap();
    let (te, _, _) = npy::read_matrix(&fte).unwrap();
    let ql = npy::read_labels(&d.join("test_feats.labels.npy")).unwrap();
    let v = json_of(&[
        "eval",
        "knn",
        "--train-features",
        s(&ftr),
        "--train-labels",
        s(&d.join("train_feats.labels.npy")),
        "--test-features",
        s(&fte),
        "--test-labels",
        s(&d.join("test_feats.labels.npy")),
        "--k",
        "1,5",
        "--json",
    ]);
    assert_eq!(v["results"], a["results"]);
    for r in a["results"].as_array().unwrap() {
        let k = r["k"].as_u64().unwrap() as usize;
        let naive = naive_knn(&tr, &tl, &te, &ql, dim, k);
        assert!(
            close(r["top1"].as_f64().unwrap(), naive),
            "k = {k}: {r} vs naive {naive}"
        );
    }

    // Linear probe, both modes (the model has 2 blocks: last4 becomes last-n:2).
    let v = json_of(&[
        "eval",
        "linear",
        "--checkpoint",
        s(&ckpt),
        "--train",
        s(&train),
        "--test",
        s(&test),
        "--epochs",
        "2",
        "--json",
    ]);
    assert_eq!(
        (v["mode"].as_str(), v["dim"].as_u64()),
        (Some("fast"), Some(128))
    );
    let v = json_of(&[
        "eval",
        "linear",
        "--checkpoint",
        s(&ckpt),
        "--train",
        s(&train),
        "--test",
        s(&test),
        "--epochs",
        "2",
        "--mode",
        "augmented",
        "--feature",
        "cls+patchmean",
        "--json",
    ]);
    assert_eq!(v["mode"], "augmented");
    let top1 = v["best_top1"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&top1));

    // Image files: 6 pack images as PNGs; queries are copies of two of them.
    let img_dir = d.join("images");
    std::fs::create_dir_all(&img_dir).unwrap();
    let src = pwself_engine::data::Pack::open(&test).unwrap();
    for i in 0..10 {
        image::GrayImage::from_raw(28, 28, src.image(i).to_vec())
            .unwrap()
            .save(img_dir.join(format!("im{i}.png")))
            .unwrap();
    }
    std::fs::copy(img_dir.join("im2.png"), img_dir.join("q2.png")).unwrap();
    std::fs::copy(img_dir.join("im4.png"), img_dir.join("q4.png")).unwrap();
    let gt = d.join("retrieval.json");
    std::fs::write(
        &gt,
        json!({"imlist": ["im0", "im1", "im2", "im3", "im4", "im5"], "qimlist": ["q2", "q4"],
               "gnd": [{"easy": [2], "hard": [], "junk": [], "bbx": [0.0, 0.0, 28.0, 28.0]},
                       {"easy": [4], "hard": [], "junk": [], "bbx": [0.0, 0.0, 28.0, 28.0]}]})
        .to_string(),
    )
    .unwrap();
    for extra in [&[][..], &["--crop-queries", "--multiscale"][..]] {
        let mut args = vec![
            "eval",
            "retrieval",
            "--checkpoint",
            s(&ckpt),
            "--gt",
            s(&gt),
            "--images",
            s(&img_dir),
            "--json",
        ];
        args.extend_from_slice(extra);
        let v = json_of(&args);
        let easy = &v["scores"][0];
        assert_eq!(easy["protocol"], "easy");
        assert!(
            close(easy["map"].as_f64().unwrap(), 1.0),
            "an exact copy ranks first: {v}"
        );
        assert_eq!(v["scores"][2]["queries_scored"], 0, "no hard positives");
    }
    // Copy detection: same copies, whitening learned on four other images.
    let cgt = img_dir.join("copy.json");
    std::fs::write(
        &cgt,
        json!({"db": ["im0.png", "im1.png", "im2.png", "im3.png", "im4.png"],
               "queries": [{"image": "q2.png", "positives": [2], "block": "exact"},
                           {"image": "q4.png", "positives": [4], "block": "exact"}],
               "whitening": ["im6.png", "im7.png", "im8.png", "im9.png"]})
        .to_string(),
    )
    .unwrap();
    let v = json_of(&[
        "eval",
        "copy",
        "--checkpoint",
        s(&ckpt),
        "--gt",
        s(&cgt),
        "--json",
    ]);
    assert_eq!(v["whitened"], true);
    assert_eq!(v["dim"], 128, "CLS + GeM");
    assert!(close(v["map"].as_f64().unwrap(), 1.0), "{v}");

    // Pictures.
    let att = d.join("att.png");
    let out = run(&[
        "viz",
        "attention",
        "--checkpoint",
        s(&ckpt),
        "--pack",
        s(&test),
        "--index",
        "3",
        "--out",
        s(&att),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pic = image::open(&att).unwrap();
    assert!(pic.width() > 224 && pic.height() > 224);
    let nb = d.join("nb.png");
    let out = run(&[
        "viz",
        "neighbours",
        "--checkpoint",
        s(&ckpt),
        "--train",
        s(&train),
        "--test",
        s(&test),
        "--queries",
        "3",
        "--k",
        "4",
        "--out",
        s(&nb),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pic = image::open(&nb).unwrap();
    // neighbour_grid's documented size: 16 + q * (104 + 28 + 16) high.
    assert_eq!(pic.height(), 16 + 3 * (104 + 28 + 16));
    let out = run(&[
        "viz",
        "neighbours",
        "--train",
        s(&train),
        "--test",
        s(&test),
        "--train-features",
        s(&ftr),
        "--test-features",
        s(&fte),
        "--out",
        s(&nb),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Refusals: an index past the pack, a pack of another channel count, a checkpoint
    // whose stored architecture disagrees with its tensors, an oversized last-n.
    refused(
        &[
            "viz",
            "attention",
            "--checkpoint",
            s(&ckpt),
            "--pack",
            s(&test),
            "--index",
            "24",
            "--out",
            s(&att),
        ],
        &["--index", "24 images"],
    );
    let rgb = d.join("rgb.pwpack");
    let mut w = PackWriter::create(&rgb, 28, 28, 3, &["a"]).unwrap();
    w.push(&[7u8; 28 * 28 * 3], 0).unwrap();
    w.finish().unwrap();
    refused(
        &[
            "eval",
            "knn",
            "--checkpoint",
            s(&ckpt),
            "--train",
            s(&rgb),
            "--test",
            s(&rgb),
        ],
        &["rgb.pwpack", "3-channel", "1 channels"],
    );
    refused(
        &[
            "eval",
            "knn",
            "--checkpoint",
            s(&ckpt),
            "--train",
            s(&train),
            "--test",
            s(&test),
            "--feature",
            "last-n:5",
        ],
        &["last-n:5", "2"],
    );
    refused(
        &[
            "eval",
            "knn",
            "--checkpoint",
            s(&ckpt),
            "--train",
            s(&train),
            "--test",
            s(&test),
            "--train-features",
            s(&ftr),
        ],
        &["--checkpoint", "not both"],
    );
    let other = d.join("other.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap();
    let mut cfg_json: Value = serde_json::from_str(&meta["config"]).unwrap();
    cfg_json["model"]["embed_dim"] = json!(192);
    meta.insert("config".into(), cfg_json.to_string());
    // With its checksum kept, the edited file is refused as damaged.
    let tampered = d.join("tampered.safetensors");
    let tensors: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().collect();
    std::fs::write(
        &tampered,
        safetensors::serialize(tensors, Some(meta.clone())).unwrap(),
    )
    .unwrap();
    refused(
        &[
            "eval",
            "knn",
            "--checkpoint",
            s(&tampered),
            "--train",
            s(&train),
            "--test",
            s(&test),
        ],
        &["tampered.safetensors", "checksum mismatch"],
    );
    // Written as a format-1 file (no checksum), so that the architecture check, not the
    // checksum, is what refuses it.
    meta.remove("checksum");
    meta.insert("format_version".into(), "1".into());
    let tensors: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().collect();
    std::fs::write(&other, safetensors::serialize(tensors, Some(meta)).unwrap()).unwrap();
    refused(
        &[
            "eval",
            "knn",
            "--checkpoint",
            s(&other),
            "--train",
            s(&train),
            "--test",
            s(&test),
        ],
        &["other.safetensors", "another architecture"],
    );
}
