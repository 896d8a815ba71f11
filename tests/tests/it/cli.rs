//! One grammar for the five tools: usage errors exit 1 (not clap's 2), `--help` lists the
//! environment each reads, the shared flags are accepted everywhere they apply.

use std::process::Command;

use anyhow::{Result, ensure};

use crate::common::{bin, smollm2_gguf};

const TOOLS: [&str; 5] = [
    "gram-data",
    "gram-model",
    "gram-train",
    "gram-export",
    "gram-score",
];

#[test]
fn usage_errors_exit_1_and_help_lists_the_environment() -> Result<()> {
    for tool in TOOLS {
        let o = Command::new(bin(tool)?).arg("--no-such-flag").output()?;
        ensure!(
            o.status.code() == Some(1),
            "{tool} --no-such-flag: {:?}",
            o.status
        );
        let o = Command::new(bin(tool)?).arg("--help").output()?;
        let help = String::from_utf8_lossy(&o.stdout);
        ensure!(o.status.success(), "{tool} --help: {:?}", o.status);
        for var in ["Environment:", "NO_PROGRESS", "RAYON_NUM_THREADS"] {
            ensure!(
                help.contains(var),
                "{tool} --help does not mention {var}:\n{help}"
            );
        }
    }
    let o = Command::new(bin("gram-score")?).arg("--help").output()?;
    let help = String::from_utf8_lossy(&o.stdout);
    for var in ["ORT_DYLIB_PATH", "RUST_LOG", "GRAM_ORT_PROFILE"] {
        ensure!(
            help.contains(var),
            "gram-score --help does not mention {var}"
        );
    }
    Ok(())
}

#[test]
fn shared_flags_mean_the_same_everywhere() -> Result<()> {
    // --model beside the positional checkpoint.
    let model = smollm2_gguf()?;
    for args in [
        vec!["inspect".into(), model.display().to_string()],
        vec![
            "inspect".into(),
            "--model".into(),
            model.display().to_string(),
        ],
    ] {
        let o = Command::new(bin("gram-model")?)
            .args(&args)
            .args(["--threads", "1"])
            .output()?;
        ensure!(
            o.status.success(),
            "gram-model {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        ensure!(
            String::from_utf8_lossy(&o.stdout).contains("vocab"),
            "gram-model {args:?} said nothing of the model"
        );
    }
    // -o/--out, -q/--quiet and --threads parse in every tool that writes or works.
    let probes: [(&str, &[&str]); 4] = [
        (
            "gram-data",
            &["build", "-o", "x", "-q", "--threads", "1", "--help"],
        ),
        (
            "gram-train",
            &["finetune", "-o", "x", "-q", "--threads", "1", "--help"],
        ),
        (
            "gram-export",
            &["onnx", "-o", "x", "--threads", "1", "--help"],
        ),
        (
            "gram-score",
            &[
                "pairwise",
                "-o",
                "x",
                "-q",
                "--threads",
                "1",
                "--overwrite",
                "--help",
            ],
        ),
    ];
    for (tool, args) in probes {
        let o = Command::new(bin(tool)?).args(args).output()?;
        ensure!(
            o.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // gram-score's --output stays an alias of --out.
    let o = Command::new(bin("gram-score")?)
        .args(["reference", "--output", "x", "--help"])
        .output()?;
    ensure!(
        o.status.success(),
        "--output: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}
