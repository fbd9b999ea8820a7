//! The GPUs of this box as nvidia-smi describes them, and how the G.O.D trainer API names
//! them. Pure functions only: the query itself runs in `executor::gpus`, since the executor
//! is the only code that spawns processes.
//!
//! The worker hands out GPU ids (`[worker] gpus`); an inventory adds what each id is (name,
//! memory). The G.O.D client accepts only three GPU types, so each name is mapped to one of
//! them or to none, and a GPU of none is left out of that API's answers.

use std::collections::BTreeMap;

use serde::Serialize;

/// One GPU as nvidia-smi reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// The index nvidia-smi gives, which is what `CUDA_VISIBLE_DEVICES` and `--gpus
    /// device=` take, and what `[worker] gpus` lists.
    pub id: u32,
    /// The product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total memory in MiB; 0 when nvidia-smi does not know it (`[N/A]`).
    pub memory_mib: u64,
}

/// The arguments of the one query run at start: one CSV line per GPU, memory in MiB.
pub const QUERY_ARGS: &[&str] = &[
    "--query-gpu=index,name,memory.total",
    "--format=csv,noheader,nounits",
];

/// Output of the query that does not read as an inventory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line} ({text:?}): {why}")]
pub struct ParseError {
    /// 1-based, counting blank lines, as the program printed it.
    pub line: usize,
    pub text: String,
    pub why: String,
}

/// Reads the query's output: lines `0, NVIDIA H100 80GB HBM3, 81559`. Blank lines and
/// spaces around fields are ignored; the name is everything between the first and the last
/// comma, so a name with a comma still reads. A memory nvidia-smi does not know (`[N/A]`,
/// `[Not Supported]`) is 0. No GPU at all is an empty list, which callers judge.
pub fn parse_inventory(text: &str) -> Result<Vec<Gpu>, ParseError> {
    let mut gpus: Vec<Gpu> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| ParseError {
            line: n + 1,
            text: line.to_string(),
            why: why.to_string(),
        };
        let (Some((index, rest)), Some((_, memory))) =
            (line.split_once(','), line.rsplit_once(','))
        else {
            return Err(bad("not three comma-separated fields: index, name, memory"));
        };
        let Some((name, _)) = rest.rsplit_once(',') else {
            return Err(bad("not three comma-separated fields: index, name, memory"));
        };
        let id: u32 = index
            .trim()
            .parse()
            .map_err(|_| bad("the index is not a whole number"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(bad("the name is empty"));
        }
        let memory = memory.trim();
        let memory_mib = if memory.starts_with('[') && memory.ends_with(']') {
            0
        } else {
            memory
                .parse()
                .map_err(|_| bad("the memory is not a whole number of MiB"))?
        };
        if gpus.iter().any(|g| g.id == id) {
            return Err(bad("the index is listed twice"));
        }
        gpus.push(Gpu {
            id,
            name: name.to_string(),
            memory_mib,
        });
    }
    Ok(gpus)
}

/// The GPU types the G.O.D client accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
pub enum GodType {
    H100,
    A100,
    A6000,
}

impl GodType {
    pub const ALL: [GodType; 3] = [GodType::H100, GodType::A100, GodType::A6000];

    pub fn as_str(self) -> &'static str {
        match self {
            GodType::H100 => "H100",
            GodType::A100 => "A100",
            GodType::A6000 => "A6000",
        }
    }

    pub fn parse(text: &str) -> Option<GodType> {
        GodType::ALL.into_iter().find(|t| t.as_str() == text)
    }
}

/// `[god_trainer] gpu_types`: a part of a GPU name (`H200`) and the type it is reported as.
pub type GpuTypes = BTreeMap<String, GodType>;

/// The type a GPU of this name is reported as: one of the three when the name holds it,
/// else the type of the longest `gpu_types` part it holds, else none. A part counts only as
/// a whole word (letters and digits not running on either side), case aside, so an
/// `RTX A1000` is not an A100 and `GH200` is not `H200`.
pub fn god_type(name: &str, gpu_types: &GpuTypes) -> Option<GodType> {
    if let Some(own) = GodType::ALL
        .into_iter()
        .find(|t| holds_word(name, t.as_str()))
    {
        return Some(own);
    }
    gpu_types
        .iter()
        .filter(|(part, _)| holds_word(name, part))
        .max_by_key(|(part, _)| part.len())
        .map(|(_, t)| *t)
}

/// Whether `part` occurs in `name` with no letter or digit right before or after it.
fn holds_word(name: &str, part: &str) -> bool {
    if part.is_empty() {
        return false;
    }
    let name = name.to_ascii_lowercase();
    let part = part.to_ascii_lowercase();
    name.match_indices(&part).any(|(at, _)| {
        let before = name[..at].chars().next_back();
        let after = name[at + part.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_alphanumeric())
    })
}

/// How a GPU is attached, as far as its name says: `NVL`, `PCIe`, `SXM` (an H100 whose name
/// says `HBM3` is the SXM board: the PCIe and NVL ones say so), else `unknown`.
pub fn interconnect(name: &str) -> &'static str {
    let upper = name.to_ascii_uppercase();
    if upper.contains("NVL") {
        "NVL"
    } else if upper.contains("PCIE") {
        "PCIe"
    } else if upper.contains("SXM") || (upper.contains("HBM3") && holds_word(name, "H100")) {
        "SXM"
    } else {
        "unknown"
    }
}

/// Memory in GiB, rounded down, as the G.O.D client expects (`81559` MiB is 79).
pub fn vram_gb(memory_mib: u64) -> u64 {
    memory_mib / 1024
}

/// One entry of `GET /v1/trainer/get_gpu_availability`, in the client's field order.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = GpuAvailability)]
pub struct Availability {
    /// The index nvidia-smi gives.
    pub gpu_id: u32,
    pub gpu_type: GodType,
    /// Memory in GiB, rounded down.
    pub vram_gb: u64,
    /// False while any unfinished job holds the GPU (either API, a trainer still stopping,
    /// a reserved offer).
    pub available: bool,
    /// Always null: the client reads it, and no end time is promised.
    #[schema(required = true)]
    pub used_until: Option<String>,
    /// The name nvidia-smi gives.
    pub product_name: String,
    /// `NVL`, `PCIe` or `SXM` when the name says so, else `unknown`.
    #[schema(value_type = String, example = "SXM")]
    pub interconnect: &'static str,
    /// Nothing in the query says, so false.
    pub nvlink: bool,
}

/// What the trainer API says about `gpu`; `None` when its name maps to no type the client
/// accepts, so that it is left out of the answer.
pub fn availability(gpu: &Gpu, gpu_types: &GpuTypes, available: bool) -> Option<Availability> {
    Some(Availability {
        gpu_id: gpu.id,
        gpu_type: god_type(&gpu.name, gpu_types)?,
        vram_gb: vram_gb(gpu.memory_mib),
        available,
        used_until: None,
        product_name: gpu.name.clone(),
        interconnect: interconnect(&gpu.name),
        nvlink: false,
    })
}

/// The GPUs of `inventory` that the trainer API leaves out, for the warning at start.
pub fn unmapped<'a>(inventory: &'a [Gpu], gpu_types: &GpuTypes) -> Vec<&'a Gpu> {
    inventory
        .iter()
        .filter(|g| god_type(&g.name, gpu_types).is_none())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn gpu(id: u32, name: &str, memory_mib: u64) -> Gpu {
        Gpu {
            id,
            name: name.into(),
            memory_mib,
        }
    }

    fn upstream_types() -> GpuTypes {
        GpuTypes::from([
            ("H200".into(), GodType::H100),
            ("GH200".into(), GodType::H100),
        ])
    }

    #[test]
    fn the_query_output_of_an_h100_box_reads() {
        let text = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n\
                    2, NVIDIA H100 80GB HBM3, 81559\n3, NVIDIA H100 80GB HBM3, 81559\n";
        let gpus = parse_inventory(text).unwrap();
        assert_eq!(gpus.len(), 4);
        assert_eq!(gpus[3], gpu(3, "NVIDIA H100 80GB HBM3", 81559));
    }

    #[test]
    fn blank_lines_spaces_and_unknown_memory_are_tolerated() {
        let text =
            "\n  0 ,  NVIDIA A100-SXM4-80GB ,   81920  \r\n\n\t1,NVIDIA GH200 480GB,[N/A]\n\n";
        assert_eq!(
            parse_inventory(text).unwrap(),
            vec![
                gpu(0, "NVIDIA A100-SXM4-80GB", 81920),
                gpu(1, "NVIDIA GH200 480GB", 0),
            ]
        );
        assert_eq!(
            parse_inventory("2, Odd, Name, 1024\n").unwrap(),
            vec![gpu(2, "Odd, Name", 1024)],
            "a comma in the name stays in the name"
        );
        assert_eq!(parse_inventory("").unwrap(), vec![]);
        assert_eq!(parse_inventory("\n \n").unwrap(), vec![]);
    }

    #[test]
    fn output_that_is_not_an_inventory_is_an_error_naming_the_line() {
        let cases = [
            ("GPU-0, NVIDIA H100, 81559", "index"),
            ("-1, NVIDIA H100, 81559", "index"),
            ("0, NVIDIA H100, 80GB", "memory"),
            ("0, NVIDIA H100", "three"),
            ("No devices were found", "three"),
            ("0, , 81559", "name"),
            ("0, A, 1\n0, B, 1", "twice"),
        ];
        for (text, why) in cases {
            let err = parse_inventory(text).unwrap_err();
            assert!(err.why.contains(why), "{text:?}: {err}");
        }
        let err = parse_inventory("0, A, 1\n\nfoo\n").unwrap_err();
        assert_eq!((err.line, err.text.as_str()), (3, "foo"));
    }

    #[test]
    fn names_map_to_the_three_types_by_their_own_words_or_the_table() {
        let none = GpuTypes::new();
        let table = upstream_types();
        for (name, want) in [
            ("NVIDIA H100 80GB HBM3", Some(GodType::H100)),
            ("NVIDIA H100 PCIe", Some(GodType::H100)),
            ("NVIDIA H100 NVL", Some(GodType::H100)),
            ("NVIDIA A100-SXM4-80GB", Some(GodType::A100)),
            ("NVIDIA A100-PCIE-40GB", Some(GodType::A100)),
            ("NVIDIA RTX A6000", Some(GodType::A6000)),
            ("nvidia rtx a6000", Some(GodType::A6000)),
            ("NVIDIA RTX A1000", None),
            ("NVIDIA H200", None),
            ("NVIDIA GeForce RTX 4090", None),
        ] {
            assert_eq!(god_type(name, &none), want, "{name}");
        }
        assert_eq!(god_type("NVIDIA H200", &table), Some(GodType::H100));
        assert_eq!(god_type("NVIDIA GH200 480GB", &table), Some(GodType::H100));
        assert_eq!(god_type("NVIDIA H200 NVL", &table), Some(GodType::H100));
        assert_eq!(god_type("NVIDIA GeForce RTX 4090", &table), None);
        // The longest part wins where two apply.
        let table = GpuTypes::from([
            ("RTX".into(), GodType::A6000),
            ("RTX 6000".into(), GodType::A100),
        ]);
        assert_eq!(
            god_type("NVIDIA RTX 6000 Ada Generation", &table),
            Some(GodType::A100)
        );
        assert_eq!(
            god_type("NVIDIA GeForce RTX 4090", &table),
            Some(GodType::A6000)
        );
    }

    #[test]
    fn interconnect_and_memory_come_from_the_name_and_the_mib() {
        for (name, want) in [
            ("NVIDIA H100 80GB HBM3", "SXM"),
            ("NVIDIA H100 PCIe", "PCIe"),
            ("NVIDIA A100-PCIE-40GB", "PCIe"),
            ("NVIDIA H100 NVL", "NVL"),
            ("NVIDIA A100-SXM4-80GB", "SXM"),
            ("NVIDIA RTX A6000", "unknown"),
            ("NVIDIA GH200 480GB", "unknown"),
        ] {
            assert_eq!(interconnect(name), want, "{name}");
        }
        assert_eq!(vram_gb(81559), 79);
        assert_eq!(vram_gb(81920), 80);
        assert_eq!(vram_gb(49140), 47);
        assert_eq!(vram_gb(1023), 0);
    }

    /// The fixture is an answer the real client accepts: every entry rendered here has its
    /// keys with values of the same JSON types, and the same values for the same GPU.
    #[test]
    fn an_entry_renders_as_the_client_expects() {
        let fixture: Value =
            serde_json::from_str(include_str!("../tests/fixtures/god/gpu-availability.json"))
                .unwrap();
        let expected = fixture.as_array().unwrap();
        let types = upstream_types();
        for want in expected {
            let id = want["gpu_id"].as_u64().unwrap() as u32;
            let available = want["available"].as_bool().unwrap();
            let got =
                availability(&gpu(id, "NVIDIA H100 80GB HBM3", 81559), &types, available).unwrap();
            let got = serde_json::to_value(&got).unwrap();
            let want = want.as_object().unwrap();
            for (key, value) in want {
                assert_eq!(&got[key], value, "{key}");
            }
            let got = got.as_object().unwrap();
            let keys: Vec<&str> = got.keys().map(String::as_str).collect();
            assert_eq!(
                keys,
                [
                    "gpu_id",
                    "gpu_type",
                    "vram_gb",
                    "available",
                    "used_until",
                    "product_name",
                    "interconnect",
                    "nvlink"
                ],
                "the fixture's keys, then the ones the trainer API adds"
            );
            assert_eq!(got["product_name"], "NVIDIA H100 80GB HBM3");
            assert_eq!(got["interconnect"], "SXM");
            assert_eq!(got["nvlink"], false);
        }
        assert_eq!(
            availability(&gpu(0, "NVIDIA GeForce RTX 4090", 24564), &types, true),
            None
        );
    }

    #[test]
    fn unmapped_gpus_are_named_for_the_warning() {
        let inventory = [
            gpu(0, "NVIDIA H100 80GB HBM3", 81559),
            gpu(1, "NVIDIA H200", 143771),
            gpu(2, "NVIDIA L40S", 46068),
        ];
        let left: Vec<u32> = unmapped(&inventory, &upstream_types())
            .iter()
            .map(|g| g.id)
            .collect();
        assert_eq!(left, [2]);
        assert_eq!(unmapped(&inventory, &GpuTypes::new()).len(), 2);
    }
}
