//! `lazypull cri pull|time-pod`: kubelet's CRI calls from the command line.
//!
//! Debian has no `crictl`, and what a platform engineer wants to know about a node is how long
//! a pod of a given image takes to start there. `time-pod` starts one the way kubelet does
//! (`cri_client::pod`) and prints each step; `make demo` uses it for its pod table. Glue only.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum CriCommand {
    /// Pull an image through CRI (`ImageService.PullImage`, as kubelet does).
    Pull(PullArgs),
    /// Start a host-network pod like kubelet (RunPodSandbox, PullImage, CreateContainer,
    /// StartContainer), wait until its script has run, print how long each step took, remove
    /// the pod. The image needs /bin/sh.
    TimePod(TimePodArgs),
}

#[derive(Args)]
pub struct Endpoint {
    /// The CRI socket: containerd's, or lazypull's CRI proxy (`cri_listen`).
    #[arg(long, default_value = "/run/containerd/containerd.sock", value_name = "SOCKET")]
    cri: PathBuf,
    /// Registry user for the pull (an image pull secret); the password is read from stdin.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
}

#[derive(Args)]
pub struct PullArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    image: String,
}

#[derive(Args)]
pub struct TimePodArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Pod name (default: time-pod-PID).
    #[arg(long)]
    name: Option<String>,
    /// Give up when the script has not finished after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Leave the pod running.
    #[arg(long)]
    keep: bool,
    /// One JSON object instead of the table (times in milliseconds).
    #[arg(long)]
    json: bool,
    image: String,
    /// Shell script the container runs (`/bin/sh -c`).
    #[arg(default_value = "true")]
    script: String,
}

pub fn run(cmd: CriCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match cmd {
        CriCommand::Pull(a) => {
            let auth = auth(&a.endpoint)?;
            let image_ref = rt.block_on(async { cri_client::Client::new(&a.endpoint.cri).pull(&a.image, auth.as_ref()).await })?;
            println!("{image_ref}");
            Ok(())
        }
        CriCommand::TimePod(a) => rt.block_on(time_pod(a)),
    }
}

fn auth(e: &Endpoint) -> Result<Option<cri_client::PullAuth>> {
    let Some(user) = &e.user else { return Ok(None) };
    let mut password = String::new();
    std::io::stdin().read_line(&mut password).context("reading the registry password from stdin")?;
    Ok(Some(cri_client::PullAuth { username: user.clone(), password: password.trim_end_matches(['\r', '\n']).to_string() }))
}

async fn time_pod(a: TimePodArgs) -> Result<()> {
    let auth = auth(&a.endpoint)?;
    let client = cri_client::Client::new(&a.endpoint.cri);
    let name = a.name.unwrap_or_else(|| format!("time-pod-{}", std::process::id()));
    // The ready and log directories are bind-mounted into the container: a private directory
    // per pod, removed with it.
    let dir = std::env::temp_dir().join(format!("lazypull-{name}"));
    let run = cri_client::pod::PodRun {
        name: name.clone(),
        namespace: "default".into(),
        image: a.image.clone(),
        script: a.script.clone(),
        ready_dir: dir.join("ready"),
        log_dir: dir.join("logs"),
        timeout: Duration::from_secs(a.timeout_secs),
    };
    let started = cri_client::pod::start(&client, &run, auth.as_ref()).await;
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            let log = std::fs::read_to_string(run.log_dir.join("app.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            let e = anyhow::Error::new(e);
            return Err(if log.is_empty() { e } else { e.context(format!("container log:\n{log}")) });
        }
    };
    let t = started.times;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if a.json {
        let v = serde_json::json!({
            "pod": name, "image": a.image, "image_ref": started.image_ref,
            "sandbox_ms": ms(t.sandbox), "pull_ms": ms(t.pull), "create_ms": ms(t.create),
            "start_ms": ms(t.start), "ready_ms": ms(t.ready), "total_ms": ms(t.total()),
        });
        println!("{v}");
    } else {
        println!("pod {name} ({}) ran its script in {:.3} s", a.image, t.total().as_secs_f64());
        for (step, d) in [("RunPodSandbox", t.sandbox), ("PullImage", t.pull), ("CreateContainer", t.create), ("StartContainer", t.start), ("until ready", t.ready)] {
            println!("  {step:<16} {:>8.3} s", d.as_secs_f64());
        }
    }
    if !a.keep {
        started.remove(&client).await.with_context(|| format!("removing pod {name}"))?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
