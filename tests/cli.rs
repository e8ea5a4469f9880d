//! The command line as a user meets it: known answers, JSON shapes, pictures, and clean
//! refusals (non-zero exit, a message naming the flag and the fix, never a panic).

mod common;

use common::{refused, run};

#[test]
fn match_prints_the_hand_worked_example() {
    // Teacher: 64x64 box, 16x16 grid of 4-px patches. Student: a 12x24 box as a 12-px view
    // (3x3 grid: 4-px rows, 8-px columns). Intersection [0,12) x [0,24): the teacher's rows
    // 0..3 pair 1:1 with the student's; its 6 columns subsample to floor(k*5/2) = 0, 2, 5.
    let out = run(&[
        "match",
        "--image",
        "64x64",
        "--patch",
        "4",
        "--view-sides",
        "64,12",
        "--box1",
        "0,0,64,64",
        "--box2",
        "0,0,12,24",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["teacher"],
        serde_json::json!([0, 1, 3, 6, 17, 19, 22, 33, 35, 38])
    );
    assert_eq!(
        v["student"],
        serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    );
    assert_eq!(
        v.as_object().unwrap().len(),
        2,
        "exactly the keys teacher and student"
    );

    let text = run(&[
        "match",
        "--box1",
        "0,0,256,256",
        "--box2",
        "0,0,256,256,flip",
        "--rule",
        "official",
    ]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("37 matched tokens")
            && text.contains("teacher: 0 ")
            && text.contains("student: 0 "),
        "{text}"
    );
}

#[test]
fn match_refuses_bad_arguments() {
    refused(
        &[
            "match",
            "--view-sides",
            "224,90",
            "--box1",
            "0,0,9,9",
            "--box2",
            "0,0,9,9",
        ],
        &["--view-sides", "90"],
    );
    refused(
        &["match", "--box1", "0,0,300,9", "--box2", "0,0,9,9"],
        &["--box1", "256x256"],
    );
    refused(
        &["match", "--box1", "0,0,9", "--box2", "0,0,9,9"],
        &["--box1", "TOP,LEFT,HEIGHT,WIDTH"],
    );
    refused(
        &[
            "match", "--image", "big", "--box1", "0,0,9,9", "--box2", "0,0,9,9",
        ],
        &["--image", "HEIGHTxWIDTH"],
    );
    refused(&["match", "--box1", "0,0,9,9"], &["--box2"]);
}

#[test]
fn views_refuse_impossible_settings() {
    refused(
        &["views", "--batches", "1", "--view-sides", "28,14"],
        &["--view-sides", "not divisible by the patch size 4"],
    );
    refused(
        &["views", "--batches", "1", "--local-scale", "0,0.4"],
        &["--local-scale", "(0, 1]"],
    );
    refused(
        &["views", "--batches", "1", "--global-scale", "0.4,1.2"],
        &["--global-scale", "(0, 1]"],
    );
    refused(
        &["views", "--batches", "1", "--data", "/nonexistent/x.pwpack"],
        &["/nonexistent/x.pwpack"],
    );
    refused(
        &["views", "--batches", "1", "--batch", "20000"],
        &["--batch", "10000 images"],
    );
}

#[test]
fn views_run_on_the_embedded_data() {
    let out = run(&["views", "--batches", "3", "--batch", "16", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["batches"], 3);
    assert_eq!(v["images"], 10_000);
    assert_eq!(v["source"], "28x28x1");
    assert!(v["views_per_second"].as_f64().unwrap() > 0.0);
    // Two 28-px globals share most of a 28x28 image: matched tokens per global pair lie
    // between CLS + 1 patch and CLS + all 49.
    let gg = v["mean_matched_tokens_global_global"].as_f64().unwrap();
    assert!((2.0..=50.0).contains(&gg), "{gg}");
}

#[test]
fn viz_matches_writes_a_picture() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("m.png");
    let out = run(&[
        "viz",
        "matches",
        "--index",
        "3",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&png).unwrap();
    // Source (28 px at 11x) + teacher (28 px at 11x) + student (12 px at 26x) + margins.
    assert_eq!(
        (img.width(), img.height()),
        (40 + 308 + 40 + 308 + 80 + 312 + 40, 40 + 312 + 40)
    );
    refused(
        &["viz", "matches", "--index", "10000"],
        &["--index", "10000 images"],
    );
    refused(&["viz", "matches", "--teacher", "5"], &["--teacher"]);
}
