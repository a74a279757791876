//! One pod started the way kubelet starts it, timed phase by phase.
//!
//! kubelet's order for a new pod is: `RunPodSandbox`, then for each container `PullImage` (if
//! the image is not present), `CreateContainer`, `StartContainer`. "Running" in the seed's sense
//! is the workload doing its job, not the runtime returning from `StartContainer` (the process
//! may still be faulting its binary in from a lazy mount), so the container's command is
//! wrapped to write a file into a host directory when it is done, and the clock stops when that
//! file appears — the same signal a readiness probe on a file would give.
//!
//! Pods are host-network, as `hostNetwork: true` pods are: no CNI plugin is needed (a test
//! machine or a freshly set up node has none), and the network setup a CNI would add is the
//! same for every snapshotter, so it would only blur the comparison. The container keeps its
//! own PID namespace.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::messages::*;
use crate::{Client, Error, PullAuth};

/// What to start.
#[derive(Clone, Debug)]
pub struct PodRun {
    /// Pod (and sandbox metadata) name; the uid is derived from it.
    pub name: String,
    pub namespace: String,
    pub image: String,
    /// A shell script run with `/bin/sh -c` in the container (the image needs `/bin/sh`).
    pub script: String,
    /// A host directory for the ready file; mounted at `/.lazypull-ready` in the container.
    pub ready_dir: PathBuf,
    /// Where the runtime writes the container's log (`<log_dir>/app.log`).
    pub log_dir: PathBuf,
    /// Give up waiting for the ready file after this long.
    pub timeout: Duration,
}

/// How long each step took; `total()` is what a user waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodTimes {
    pub sandbox: Duration,
    pub pull: Duration,
    pub create: Duration,
    pub start: Duration,
    /// From `StartContainer` returning to the ready file.
    pub ready: Duration,
}

impl PodTimes {
    pub fn total(&self) -> Duration {
        self.sandbox + self.pull + self.create + self.start + self.ready
    }
}

/// A started pod: its ids and times. [`StartedPod::remove`] stops and removes it.
#[derive(Debug)]
pub struct StartedPod {
    pub pod_sandbox_id: String,
    pub container_id: String,
    pub image_ref: String,
    pub times: PodTimes,
}

impl StartedPod {
    /// `StopPodSandbox` then `RemovePodSandbox`.
    pub async fn remove(&self, client: &Client) -> Result<(), Error> {
        client.stop_pod_sandbox(&self.pod_sandbox_id).await?;
        client.remove_pod_sandbox(&self.pod_sandbox_id).await
    }
}

/// Mount point of the ready directory inside the container.
pub const READY_MOUNT: &str = "/.lazypull-ready";
/// The file the wrapped command writes when the script has finished.
pub const READY_FILE: &str = "done";

/// The sandbox config of a host-network pod.
pub fn host_network_sandbox(run: &PodRun) -> PodSandboxConfig {
    let node = NamespaceOption { network: NAMESPACE_NODE, pid: NAMESPACE_POD, ipc: NAMESPACE_POD };
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata { name: run.name.clone(), uid: format!("{}-uid", run.name), namespace: run.namespace.clone(), attempt: 0 }),
        // Host-network pods have no UTS namespace of their own: the node's hostname.
        hostname: String::new(),
        log_directory: run.log_dir.display().to_string(),
        labels: HashMap::new(),
        linux: Some(LinuxPodSandboxConfig { cgroup_parent: String::new(), security_context: Some(LinuxSandboxSecurityContext { namespace_options: Some(node) }) }),
    }
}

/// The container config: `script`, then the ready file.
pub fn container(run: &PodRun) -> ContainerConfig {
    let node = NamespaceOption { network: NAMESPACE_NODE, pid: NAMESPACE_CONTAINER, ipc: NAMESPACE_POD };
    ContainerConfig {
        metadata: Some(ContainerMetadata { name: "app".into(), attempt: 0 }),
        image: Some(ImageSpec { image: run.image.clone() }),
        command: vec!["/bin/sh".into(), "-c".into(), format!("{}\necho ok > {READY_MOUNT}/{READY_FILE}", run.script)],
        mounts: vec![Mount { container_path: READY_MOUNT.into(), host_path: run.ready_dir.display().to_string(), readonly: false }],
        log_path: "app.log".into(),
        linux: Some(LinuxContainerConfig { security_context: Some(LinuxContainerSecurityContext { namespace_options: Some(node) }) }),
    }
}

/// Starts `run` and waits for its ready file. The pod is left running (the caller removes it)
/// unless a step fails, in which case what was created is removed before the error returns.
pub async fn start(client: &Client, run: &PodRun, auth: Option<&PullAuth>) -> Result<StartedPod, Error> {
    let io = |what: &str| {
        let (pod, what) = (run.name.clone(), what.to_string());
        move |source| Error::Io { pod, what, source }
    };
    std::fs::create_dir_all(&run.ready_dir).map_err(io("creating the ready directory"))?;
    std::fs::create_dir_all(&run.log_dir).map_err(io("creating the log directory"))?;
    let ready_file = run.ready_dir.join(READY_FILE);
    match std::fs::remove_file(&ready_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing an old ready file")(e)),
    }
    let sandbox = host_network_sandbox(run);
    let mut times = PodTimes::default();
    let t = Instant::now();
    let pod_sandbox_id = client.run_pod_sandbox(&sandbox).await?;
    times.sandbox = t.elapsed();
    let result = async {
        let t = Instant::now();
        let image_ref = client.pull(&run.image, auth).await?;
        times.pull = t.elapsed();
        let t = Instant::now();
        let container_id = client.create_container(&pod_sandbox_id, container(run), &sandbox).await?;
        times.create = t.elapsed();
        let t = Instant::now();
        client.start_container(&container_id).await?;
        times.start = t.elapsed();
        let t = Instant::now();
        let deadline = t + run.timeout;
        loop {
            match std::fs::read(&ready_file) {
                Ok(b) if b == b"ok\n" => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("reading the ready file")(e)),
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady { pod: run.name.clone(), timeout_secs: run.timeout.as_secs(), ready_file: ready_file.clone() });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.ready = t.elapsed();
        Ok((image_ref, container_id))
    }
    .await;
    match result {
        Ok((image_ref, container_id)) => Ok(StartedPod { pod_sandbox_id, container_id, image_ref, times }),
        Err(e) => {
            let _ = client.stop_pod_sandbox(&pod_sandbox_id).await;
            let _ = client.remove_pod_sandbox(&pod_sandbox_id).await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> PodRun {
        PodRun {
            name: "p".into(),
            namespace: "default".into(),
            image: "r/i:t".into(),
            script: "echo hi".into(),
            ready_dir: "/tmp/r".into(),
            log_dir: "/tmp/l".into(),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_command_writes_the_ready_file_after_the_script() {
        let c = container(&run());
        assert_eq!(c.command[..2], ["/bin/sh".to_string(), "-c".to_string()]);
        let script = &c.command[2];
        assert!(script.starts_with("echo hi\n"), "{script}");
        assert!(script.ends_with("echo ok > /.lazypull-ready/done"), "{script}");
        assert_eq!(c.mounts[0].host_path, "/tmp/r");
        assert_eq!(c.mounts[0].container_path, READY_MOUNT);
    }

    #[test]
    fn pods_use_the_node_network() {
        let s = host_network_sandbox(&run());
        let ns = s.linux.unwrap().security_context.unwrap().namespace_options.unwrap();
        assert_eq!(ns.network, NAMESPACE_NODE);
        let c = container(&run()).linux.unwrap().security_context.unwrap().namespace_options.unwrap();
        assert_eq!(c.network, NAMESPACE_NODE);
    }

    #[tokio::test]
    async fn a_runtime_that_is_not_there_is_a_connect_error_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nothing.sock");
        let err = Client::new(&sock).pull("r/i:t", None).await.unwrap_err();
        assert!(matches!(err, Error::Connect { method: "PullImage", .. } | Error::Call { method: "PullImage", .. }), "{err:?}");
        if let Some(status) = err.status() {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{err:?}");
        }
        assert!(err.to_string().contains("nothing.sock"), "{err}");
    }
}
