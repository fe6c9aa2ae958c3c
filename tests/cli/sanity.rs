//! End-to-end tests of the benchmark's ground-truth checks in `vitcx eval`: curves against the
//! image without its object (`synth` writes it), and the model-randomisation sanity check.

use crate::common::{s, stderr, vitcx};

fn read_json(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn background_curves_and_the_sanity_check_on_synth_data() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let o = vitcx(&[
        "synth",
        "--count",
        "4",
        "--seed",
        "3",
        "--out",
        s(&ds),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tmp.path().join("out");
    let o = vitcx(&[
        "eval",
        "--model",
        "demo",
        "--data",
        s(&ds),
        "--methods",
        "vitcx,center",
        "--noise-std",
        "0",
        "--step",
        "12544",
        "--insertion-baseline",
        "background",
        "--background-curves",
        "--sanity",
        "--out",
        s(&out),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let csv = std::fs::read_to_string(out.join("per_image.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(
        &rows[0][9..],
        [
            "pointing_game_15px",
            "energy_pointing_game",
            "energy_pointing_game_minmax",
            "deletion_auc_background",
            "insertion_auc_background"
        ]
    );
    assert_eq!(rows.len(), 1 + 2 * 4, "{csv}");
    for r in &rows[1..] {
        // The configured insertion already starts from the background: the same curve.
        assert_eq!(r[7], r[13], "{r:?}");
        let del: f64 = r[12].parse().unwrap();
        assert!((0.0..=1.0).contains(&del), "{r:?}");
    }

    let summary = read_json(&out.join("summary.json"));
    let st = &summary["settings"];
    assert_eq!(st["insertion_baseline"]["kind"], "background");
    assert_eq!(st["background_curves"], true);
    let steps = ["head", "head+1", "head+2", "head+3", "head+4", "full"];
    assert_eq!(st["sanity"]["steps"], serde_json::json!(steps));
    assert_eq!(summary["sanity"]["steps"], serde_json::json!(steps));
    assert_eq!(summary["vitcx"]["insertion_auc_background"]["n"], 4);
    // The centred blob ignores the model: unchanged by any randomisation. ViT-CX's map is made
    // by the model, so randomising every weight changes it.
    let sanity = &summary["sanity"]["methods"];
    for step in steps {
        assert_eq!(sanity["center"][step]["mean"], 1.0, "{step}");
        assert_eq!(sanity["center"][step]["n"], 4, "{step}");
    }
    let full = sanity["vitcx"]["full"]["mean"].as_f64().unwrap();
    assert!(full < 0.9, "ViT-CX after full randomisation: {full}");
    let table = std::fs::read_to_string(out.join("sanity.csv")).unwrap();
    assert_eq!(table.lines().count(), 1 + 2 * steps.len(), "{table}");
    let md = std::fs::read_to_string(out.join("sanity.md")).unwrap();
    assert!(md.starts_with("| randomised | ViT-CX | center |"), "{md}");
    assert!(md.contains("| every weight | "), "{md}");
    let per_image = std::fs::read_to_string(out.join("sanity_per_image.csv")).unwrap();
    assert_eq!(per_image.lines().count(), 1 + 2 * 4 * steps.len());
    for png in ["deletion_background.png", "insertion_background.png"] {
        assert!(out.join(png).is_file(), "{png}");
    }

    // The report is made from the run record: a merge of this one run gives the same files.
    let merged = tmp.path().join("merged");
    let o = vitcx(&["merge", s(&out), "--out", s(&merged)]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["per_image.csv", "sanity.csv", "sanity.md", "table.md"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(merged.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn the_background_baseline_needs_backgrounds() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let o = vitcx(&[
        "synth",
        "--count",
        "2",
        "--seed",
        "1",
        "--out",
        s(&ds),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The second image loses its background: it fails with the reason, the first is scored.
    let manifest = std::fs::read_to_string(ds.join("manifest.jsonl")).unwrap();
    let lines: Vec<&str> = manifest.lines().collect();
    let bare = lines[1].replace(r#","background":"00001.background.png""#, "");
    assert_ne!(bare, lines[1]);
    std::fs::write(ds.join("manifest.jsonl"), format!("{}\n{bare}\n", lines[0])).unwrap();
    let out = tmp.path().join("out");
    let o = vitcx(&[
        "eval",
        "--model",
        "demo",
        "--data",
        s(&ds),
        "--methods",
        "center",
        "--step",
        "25088",
        "--deletion-baseline",
        "background",
        "--out",
        s(&out),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("00001.png has no background"), "{e}");
    let csv = std::fs::read_to_string(out.join("per_image.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
    // compare has no background to use: one line, exit 2.
    let o = vitcx(&[
        "compare",
        s(&ds.join("00000.png")),
        "--model",
        "demo",
        "--insertion-baseline",
        "background",
        "--out",
        s(&tmp.path().join("cmp")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("background baseline needs the image without its object"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
}
