//! What checkpoints' configuration files say, as typed structs: the parts of timm's
//! `config.json` and of Hugging Face's `config.json` / `preprocessor_config.json` that every model
//! family reads (format, labels, preprocessing). A family reads its own fields with [`parse`]
//! into a struct of its own, so the checks stay typed and the errors name the file and field.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// ImageNet mean/std (timm's `IMAGENET_DEFAULT_*`, DeiT and most CNN-era models).
pub const IMAGENET_DEFAULT_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet std, see [`IMAGENET_DEFAULT_MEAN`].
pub const IMAGENET_DEFAULT_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// timm's `IMAGENET_INCEPTION_*` mean (0.5), the default of its ViTs.
pub const IMAGENET_INCEPTION_MEAN: [f32; 3] = [0.5, 0.5, 0.5];
/// timm's `IMAGENET_INCEPTION_*` std (0.5).
pub const IMAGENET_INCEPTION_STD: [f32; 3] = [0.5, 0.5, 0.5];

/// Checkpoint layout the model was loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Format {
    /// timm: `config.json` with `architecture` (and `model_args`, `pretrained_cfg`).
    Timm,
    /// Hugging Face transformers: `config.json` with `model_type`.
    HuggingFace,
}

impl Format {
    /// Tells the format from `config.json`: `model_type` means Hugging Face, `architecture`
    /// means timm.
    pub fn detect(config_path: &Path, config: &Value) -> Result<Format> {
        if config.get("model_type").is_some() {
            Ok(Format::HuggingFace)
        } else if config.get("architecture").is_some() {
            Ok(Format::Timm)
        } else {
            Err(Error::Checkpoint {
                path: config_path.to_path_buf(),
                reason:
                    "neither 'model_type' (Hugging Face) nor 'architecture' (timm) in config.json"
                        .into(),
            })
        }
    }
}

/// How images are prepared for the model, as its checkpoint states it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preprocess {
    /// Per-channel mean (RGB) subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel std (RGB) divided by after subtracting the mean.
    pub std: [f32; 3],
    /// Input size `(H, W)`.
    pub input_size: (usize, usize),
    /// The interpolation of the checkpoint's own eval transform (timm `interpolation`, Hugging
    /// Face `resample`), when stated. vitcx resizes as the reference does whatever it says
    /// (docs/algorithm.md §6.2); it is reported so that a user can see the difference.
    pub interpolation: Option<String>,
    /// The centre-crop fraction of the checkpoint's own eval transform (timm `crop_pct`), when
    /// stated; reported, not applied (the explanation covers the whole picture).
    pub crop_pct: Option<f64>,
    /// The shortest edge the checkpoint's own transform resizes to before cropping (Hugging Face
    /// `size.shortest_edge`; timm `input_size / crop_pct`), when it says so; used by
    /// `--resize processor`.
    pub resize_shortest: Option<usize>,
    /// The centre crop of the checkpoint's own transform (Hugging Face `crop_size` when
    /// `do_center_crop`; timm `input_size`), when it says so; used by `--resize processor`.
    pub crop: Option<(usize, usize)>,
}

impl Preprocess {
    /// Fails unless every mean is finite and every std positive and finite (a std of 0 would
    /// turn every input into infinities, and the explanation into NaN).
    pub fn check(&self, config_path: &Path) -> Result<()> {
        let bad = |what: &str, v: &[f32; 3]| Error::Checkpoint {
            path: config_path.to_path_buf(),
            reason: format!(
                "{what} {v:?}: every value must be finite{}",
                if what == "std" { " and above 0" } else { "" }
            ),
        };
        if self.mean.iter().any(|m| !m.is_finite()) {
            return Err(bad("mean", &self.mean));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(bad("std", &self.std));
        }
        Ok(())
    }
}

/// A size as configuration files spell it: an integer (square), `[H, W]`, `[C, H, W]`,
/// `{"height", "width"}` or `{"shortest_edge"}` (Hugging Face image processors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub usize, pub usize);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let int = |x: &Value| x.as_u64().map(|n| n as usize);
        let size = match &v {
            Value::Number(_) => int(&v).map(|n| Size(n, n)),
            Value::Array(a) => match a.iter().map(int).collect::<Option<Vec<_>>>().as_deref() {
                Some([h, w]) | Some([_, h, w]) => Some(Size(*h, *w)),
                _ => None,
            },
            Value::Object(m) => match (m.get("height"), m.get("width"), m.get("shortest_edge")) {
                (Some(h), Some(w), _) => int(h).zip(int(w)).map(|(h, w)| Size(h, w)),
                (_, _, Some(s)) => int(s).map(|s| Size(s, s)),
                _ => None,
            },
            _ => None,
        };
        size.ok_or_else(|| serde::de::Error::custom(format!("{v} is not a size")))
    }
}

/// The fields of a timm `config.json` that do not depend on the architecture (a family reads
/// its `model_args` into a struct of its own with [`parse`]).
#[derive(Debug, Clone, Deserialize)]
pub struct TimmConfig {
    /// timm model name, e.g. `vit_base_patch16_224`.
    pub architecture: String,
    /// Output classes.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Pooling of the classifier (`token`, `avg`, `map`, ...); also in `model_args`.
    #[serde(default)]
    pub global_pool: Option<String>,
    /// The data configuration the weights were trained with.
    #[serde(default)]
    pub pretrained_cfg: Option<PretrainedCfg>,
    /// Class names (any JSON value; a non-string is written out as JSON).
    #[serde(default)]
    pub label_names: Option<Vec<Value>>,
}

/// timm's `pretrained_cfg` (the parts vitcx reads).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PretrainedCfg {
    /// `[C, H, W]`.
    #[serde(default)]
    pub input_size: Option<Size>,
    /// Per-channel mean.
    #[serde(default)]
    pub mean: Option<[f32; 3]>,
    /// Per-channel std.
    #[serde(default)]
    pub std: Option<[f32; 3]>,
    /// e.g. `bicubic`.
    #[serde(default)]
    pub interpolation: Option<String>,
    /// e.g. 0.9.
    #[serde(default)]
    pub crop_pct: Option<f64>,
}

/// The fields of a Hugging Face `config.json` that do not depend on the model type.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// e.g. `vit`, `deit`.
    pub model_type: String,
    /// e.g. `["ViTForImageClassification"]`.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// Class names by index (`"0": "tench"`).
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, Value>>,
}

impl HfConfig {
    /// `architectures[0]`, else the model type.
    pub fn architecture(&self) -> String {
        self.architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .unwrap_or_else(|| self.model_type.clone())
    }
}

/// A Hugging Face `preprocessor_config.json` (image processors).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfPreprocessor {
    /// Per-channel mean.
    #[serde(default)]
    pub image_mean: Option<[f32; 3]>,
    /// Per-channel std.
    #[serde(default)]
    pub image_std: Option<[f32; 3]>,
    /// Resize target.
    #[serde(default)]
    pub size: Option<Size>,
    /// Centre-crop size, used when `do_center_crop`.
    #[serde(default)]
    pub crop_size: Option<Size>,
    /// Whether the processor crops.
    #[serde(default)]
    pub do_center_crop: Option<bool>,
    /// PIL resampling filter number (2 bilinear, 3 bicubic).
    #[serde(default)]
    pub resample: Option<u32>,
}

impl HfPreprocessor {
    /// PIL's name of the `resample` filter.
    pub fn interpolation(&self) -> Option<String> {
        self.resample.map(|r| {
            match r {
                0 => "nearest",
                1 => "lanczos",
                2 => "bilinear",
                3 => "bicubic",
                4 => "box",
                5 => "hamming",
                _ => "unknown",
            }
            .to_string()
        })
    }
}

/// What a Hugging Face family reads from `preprocessor_config.json`: mean, std, resampling, the
/// centre crop (when the processor crops), the shortest edge it resizes to, and the size the
/// model is then given (the crop, else the resize), for the family to compare with its own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HfPreprocessing {
    /// Per-channel mean, if given.
    pub mean: Option<[f32; 3]>,
    /// Per-channel std, if given.
    pub std: Option<[f32; 3]>,
    /// PIL's name of the resampling filter, if given.
    pub interpolation: Option<String>,
    /// The centre crop `(H, W)`, when `do_center_crop`.
    pub crop: Option<(usize, usize)>,
    /// `size.shortest_edge`, when the processor resizes that way.
    pub resize_shortest: Option<usize>,
    /// The size the processor hands the model: the crop, else `size`.
    pub seen: Option<(usize, usize)>,
}

impl HfPreprocessing {
    /// From the parsed processor `pre` and its raw JSON `raw` (for `size.shortest_edge`); with
    /// no processor, a note saying so and every field empty.
    pub fn read(
        pre: Option<&HfPreprocessor>,
        raw: Option<&Value>,
        notes: &mut Vec<String>,
    ) -> HfPreprocessing {
        let Some(p) = pre else {
            notes.push("no preprocessor_config.json".into());
            return HfPreprocessing::default();
        };
        let crop = p
            .crop_size
            .filter(|_| p.do_center_crop.unwrap_or(false))
            .map(|Size(h, w)| (h, w));
        HfPreprocessing {
            mean: p.image_mean,
            std: p.image_std,
            interpolation: p.interpolation(),
            crop,
            resize_shortest: raw
                .and_then(|v| v.get("size")?.get("shortest_edge")?.as_u64())
                .map(|n| n as usize),
            seen: crop.or(p.size.map(|Size(h, w)| (h, w))),
        }
    }

    /// A note when the processor hands the model another size than the `built` one it takes
    /// (the model's size wins: its position table fixes it).
    pub fn note_other_size(&self, built: (usize, usize), notes: &mut Vec<String>) {
        if let Some((h, w)) = self.seen.filter(|s| *s != built) {
            notes.push(format!(
                "preprocessor_config.json resizes to {h}x{w} but the model takes {}x{}; using {}x{}",
                built.0, built.1, built.0, built.1
            ));
        }
    }

    /// A note when the processor gives no mean or std; `default` names what is used instead.
    pub fn note_missing_stats(&self, default: &str, notes: &mut Vec<String>) {
        if self.mean.is_none() || self.std.is_none() {
            notes.push(format!("image_mean/image_std not given; using {default}"));
        }
    }
}

/// A Hugging Face config's `image_size`, else transformers' `default` with a note saying so.
pub fn hf_image_size(
    stated: Option<Size>,
    default: usize,
    notes: &mut Vec<String>,
) -> (usize, usize) {
    match stated {
        Some(Size(h, w)) => (h, w),
        None => {
            notes.push(format!(
                "image_size not in config.json; using {default}, transformers' default"
            ));
            (default, default)
        }
    }
}

/// `value` (read from `path`) as a `T`; a field of the wrong type or shape is an error naming the
/// file, the field's path and what was expected.
pub fn parse<T: DeserializeOwned>(path: &Path, value: &Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let reason = describe(value, &field, &e.inner().to_string());
        Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        }
    })
}

/// One line for a deserialisation error at `field`: `field 'x' is 4, expected a string`.
fn describe(root: &Value, field: &str, inner: &str) -> String {
    let at = field
        .split('.')
        .try_fold(root, |v, key| match key.parse::<usize>() {
            Ok(i) if v.is_array() => v.get(i),
            _ => v.get(key),
        });
    let expected = inner
        .split_once(", expected ")
        .map(|(_, e)| humanize(e.trim_end_matches('.')));
    match (at, expected) {
        (Some(v), Some(e)) if inner.starts_with("invalid ") => {
            format!("field '{field}' is {v}, expected {e}")
        }
        _ if field == "." => inner.to_string(),
        _ => format!("field '{field}': {inner}"),
    }
}

/// serde's type names in words.
fn humanize(expected: &str) -> String {
    match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" | "i64" | "i32" => "an integer".into(),
        "f64" | "f32" => "a number".into(),
        "a boolean" => "true or false".into(),
        "an array of length 3" => "3 numbers".into(),
        other => other.into(),
    }
}

/// Class names from a timm `label_names` (or `class_<i>` where there are none), checked
/// against the head's `num_classes`.
pub fn timm_labels(
    path: &Path,
    names: Option<&[Value]>,
    num_classes: usize,
) -> Result<Vec<String>> {
    let Some(names) = names else {
        return Ok(default_labels(num_classes));
    };
    if names.len() != num_classes {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!(
                "config.json label_names has {} names but the head has {num_classes} classes",
                names.len()
            ),
        });
    }
    Ok(names.iter().map(label_text).collect())
}

/// Class names from a Hugging Face `id2label` (or `class_<i>` where there is none), checked
/// against the head's `num_classes`; `head` names the head's tensor in the error.
pub fn hf_labels(
    path: &Path,
    id2label: Option<&BTreeMap<String, Value>>,
    num_classes: usize,
    head: &str,
) -> Result<Vec<String>> {
    let mut labels = default_labels(num_classes);
    let Some(map) = id2label else {
        return Ok(labels);
    };
    let err = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    if map.len() != num_classes {
        return Err(err(format!(
            "config.json id2label has {} labels but '{head}' has {num_classes} rows",
            map.len()
        )));
    }
    for (k, v) in map {
        let i: usize = k.parse().ok().filter(|i| *i < num_classes).ok_or_else(|| {
            err(format!(
                "id2label key '{k}' is not a class index below {num_classes}"
            ))
        })?;
        labels[i] = label_text(v);
    }
    Ok(labels)
}

fn label_text(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// `class_0`, `class_1`, ...
pub fn default_labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("class_{i}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Sizes {
        a: Size,
        b: Size,
        c: Size,
        d: Size,
        e: Size,
        missing: Option<Size>,
    }

    #[test]
    fn sizes_in_all_spellings() {
        let v = serde_json::json!({
            "a": 224, "b": [3, 256, 192], "c": [384, 320], "d": {"height": 240, "width": 200},
            "e": {"shortest_edge": 256}, "f": "big", "g": [1, 2, 3, 4]
        });
        let s: Sizes = parse(Path::new("config.json"), &v).unwrap();
        assert_eq!(s.a, Size(224, 224));
        assert_eq!(s.b, Size(256, 192));
        assert_eq!(s.c, Size(384, 320));
        assert_eq!(s.d, Size(240, 200));
        assert_eq!(s.e, Size(256, 256));
        assert_eq!(s.missing, None);
        for bad in ["f", "g"] {
            #[derive(Debug, Deserialize)]
            #[allow(dead_code)]
            struct One(std::collections::HashMap<String, Size>);
            let v = serde_json::json!({ bad: v[bad].clone() });
            match parse::<One>(Path::new("config.json"), &v) {
                Err(Error::Checkpoint { reason, .. }) => {
                    assert!(reason.contains(&format!("field '{bad}'")), "{reason}")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn typed_getters_name_the_field() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Args {
            depth: Option<usize>,
            eps: Option<f64>,
            mean: Option<[f32; 3]>,
        }
        let v = serde_json::json!({"depth": "four"});
        match parse::<Args>(Path::new("config.json"), &v) {
            Err(Error::Checkpoint { reason, .. }) => {
                assert_eq!(reason, "field 'depth' is \"four\", expected an integer")
            }
            other => panic!("unexpected {other:?}"),
        }
        let v = serde_json::json!({"eps": 1e-6});
        let a: Args = parse(Path::new("config.json"), &v).unwrap();
        assert_eq!(a.eps, Some(1e-6));
        let v = serde_json::json!({"mean": [0.5, 0.5]});
        let e = parse::<Args>(Path::new("config.json"), &v).unwrap_err();
        assert!(e.to_string().contains("field 'mean'"), "{e}");
        // A nested field is named by its whole path.
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Outer {
            model_args: Args,
        }
        let v = serde_json::json!({"model_args": {"eps": "small"}});
        let e = parse::<Outer>(Path::new("config.json"), &v).unwrap_err();
        assert!(
            e.to_string()
                .contains("field 'model_args.eps' is \"small\", expected a number"),
            "{e}"
        );
    }

    #[test]
    fn format_detection() {
        let p = Path::new("config.json");
        let hf = serde_json::json!({"model_type": "vit"});
        let timm = serde_json::json!({"architecture": "vit_tiny_patch16_224"});
        assert_eq!(Format::detect(p, &hf).unwrap(), Format::HuggingFace);
        assert_eq!(Format::detect(p, &timm).unwrap(), Format::Timm);
        assert!(Format::detect(p, &serde_json::json!({})).is_err());
    }

    #[test]
    fn labels_are_checked_against_the_head() {
        let p = Path::new("config.json");
        let names = vec![serde_json::json!("a"), serde_json::json!(7)];
        assert_eq!(timm_labels(p, Some(&names), 2).unwrap(), vec!["a", "7"]);
        assert!(timm_labels(p, Some(&names), 3).is_err());
        assert_eq!(timm_labels(p, None, 2).unwrap(), vec!["class_0", "class_1"]);
        let map: BTreeMap<String, Value> = [("1".to_string(), serde_json::json!("dog"))].into();
        let e = hf_labels(p, Some(&map), 2, "classifier.weight").unwrap_err();
        assert!(e.to_string().contains("id2label has 1 labels"), "{e}");
        let map: BTreeMap<String, Value> = [
            ("0".to_string(), serde_json::json!("cat")),
            ("1".to_string(), serde_json::json!("dog")),
        ]
        .into();
        assert_eq!(
            hf_labels(p, Some(&map), 2, "x").unwrap(),
            vec!["cat", "dog"]
        );
    }
}
