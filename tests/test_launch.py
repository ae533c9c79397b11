"""Launchers (launch/): TPU-pod and SLURM scripts and the sweep driver.

Nothing here trains or needs gcloud/SLURM: the scripts' dry runs are checked, and
SLURM's tools and the trainer are replaced by small stubs on PATH.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = "launch/tpu_pod.sh"
SLURM = "launch/slurm.sbatch"
SWEEP = "launch/sweep.py"
TUPLE = "--config.model.connector.budgets=(16, 64)"
OVERRIDES = ["--config.seed=1", "--config.model.connector.budgets=16,", TUPLE,
             "--config.data.name=it's"]


def run(cmd, env=None, **kw):
  full_env = {**os.environ, **(env or {})}
  return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                        timeout=30, **kw)


def lines(out):
  return [l for l in out.splitlines() if l.strip()]


def remote_command(gcloud_line):
  """The shell command a `gcloud ... ssh ... --command CMD` line runs on the workers."""
  argv = shlex.split(gcloud_line)
  return argv, argv[argv.index("--command") + 1]


def write_exe(path, text):
  path.write_text(textwrap.dedent(text).lstrip())
  path.chmod(0o755)
  return path


# ------------------------------------------------------------------------- tpu_pod.sh

def test_tpu_pod_dry_run_prints_gcloud_command_on_all_workers():
  r = run(["bash", TPU_POD, "--dry-run", "--tpu=my-pod", "--zone", "us-central2-b",
           "--project=proj", "--workdir=gs://bucket/run1", "--config=configs/base.py:m3",
           "--", *OVERRIDES])
  assert r.returncode == 0, r.stderr
  (line,) = lines(r.stdout)
  argv, cmd = remote_command(line)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
  assert "--worker=all" in argv and "--zone=us-central2-b" in argv and "--project=proj" in argv
  # The remote shell splits the command back into exactly the train argv (tuples intact).
  assert shlex.split(cmd) == ["cd", "parcel_jax", "&&", ".venv/bin/python", "-m",
                              "parcel_jax.train", "--config=configs/base.py:m3",
                              "--workdir=gs://bucket/run1", "--distributed", *OVERRIDES]
  r = run(["bash", TPU_POD, "--dry-run", "--tpu=p", "--zone=z", "--workdir=/w", "--no-distributed"])
  assert shlex.split(remote_command(r.stdout)[1])[-1] == "--workdir=/w"


def test_tpu_pod_reads_environment_and_setup_steps():
  env = {"TPU_NAME": "pod2", "ZONE": "europe-west4-a", "WORKDIR": "gs://b/w", "PROJECT": ""}
  r = run(["bash", TPU_POD, "--dry-run", "--setup"], env=env)
  assert r.returncode == 0, r.stderr
  tar, scp, setup, train = lines(r.stdout)
  assert "git -C" in tar and "| tar" in tar
  assert shlex.split(scp)[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  for line in (scp, setup, train):
    assert "--worker=all" in shlex.split(line) and "--zone=europe-west4-a" in shlex.split(line)
    assert "--project" not in line
  _, setup_cmd = remote_command(setup)
  assert "pip install -q -r requirements.txt" in setup_cmd and "jax[tpu]" in setup_cmd
  _, train_cmd = remote_command(train)
  assert shlex.split(train_cmd)[-4:] == ["parcel_jax.train", "--config=configs/base.py",
                                         "--workdir=gs://b/w", "--distributed"]
  r = run(["bash", TPU_POD, "--dry-run", "--setup", "--repo=https://example.com/p.git"], env=env)
  setup, _ = lines(r.stdout)
  assert "git clone --branch main https://example.com/p.git parcel_jax" in remote_command(setup)[1]


def test_tpu_pod_usage_errors():
  r = run(["bash", TPU_POD, "--dry-run", "--zone=z", "--workdir=/w"], env={"TPU_NAME": ""})
  assert r.returncode == 2 and "--tpu" in r.stderr
  r = run(["bash", TPU_POD, "--dry-run", "--tpu=p", "--zone=z", "--workdir=/w", "--config.seed=1"])
  assert r.returncode == 2 and "after --" in r.stderr
  r = run(["bash", TPU_POD, "--help"])
  assert r.returncode == 0 and "--worker=all" in r.stdout


# --------------------------------------------------------------------------- scripts

def test_scripts_parse():
  for script in (TPU_POD, SLURM):
    r = run(["bash", "-n", script])
    assert r.returncode == 0, r.stderr


def test_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  r = run(["shellcheck", TPU_POD, SLURM])
  assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------- slurm.sbatch

@pytest.fixture
def slurm_env(tmp_path):
  """Fake SLURM allocation: SLURM_* variables and `scontrol`/`srun`/`python` stubs on PATH."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_exe(bin_dir / "scontrol", """
      #!/bin/bash
      if [[ "$1 $2 $3" == "show hostnames gpu-node-[07-08]" ]]; then
        printf 'gpu-node-07\\ngpu-node-08\\n'
      else
        exit 1
      fi
  """)
  # srun: drop its options, run the task command once per task with SLURM_PROCID set.
  write_exe(bin_dir / "srun", """
      #!/bin/bash
      while [[ "$1" == --* ]]; do shift; done
      for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || exit; done
  """)
  # python: print its argv as JSON.
  write_exe(bin_dir / "python", f"""
      #!{sys.executable}
      import json, sys
      print(json.dumps(sys.argv[1:]))
  """)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
          "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2",
          "SLURM_SUBMIT_DIR": ROOT, "WORKDIR": "/shared/run1", "CONFIG": "configs/base.py",
          "SLURM_PROCID": "0"}


def test_slurm_dry_run_prints_srun_with_coordinator(slurm_env):
  r = run(["bash", SLURM, *OVERRIDES], env={**slurm_env, "DRY_RUN": "1"})
  assert r.returncode == 0, r.stderr
  (line,) = lines(r.stdout)
  argv = shlex.split(line)
  assert argv[0] == "srun" and "--ntasks=2" in argv and "--ntasks-per-node=1" in argv
  train = argv[argv.index("-m") - 1:]
  assert train == ["python", "-m", "parcel_jax.train", "--config=configs/base.py",
                   "--workdir=/shared/run1", "--coordinator_address=gpu-node-07:24242",
                   "--num_processes=2", *OVERRIDES]
  assert '--process_id="$SLURM_PROCID"' in line  # read inside each task, not in the batch step


def test_slurm_each_task_gets_its_process_id(slurm_env):
  r = run(["bash", SLURM, *OVERRIDES], env={**slurm_env, "COORDINATOR_PORT": "1234"})
  assert r.returncode == 0, r.stderr
  tasks = [json.loads(l) for l in lines(r.stdout) if l.startswith("[")]
  assert len(tasks) == 2
  for i, argv in enumerate(tasks):
    assert argv == ["-m", "parcel_jax.train", "--config=configs/base.py", "--workdir=/shared/run1",
                    "--coordinator_address=gpu-node-07:1234", "--num_processes=2", *OVERRIDES,
                    f"--process_id={i}"]


def test_slurm_requires_workdir(slurm_env):
  r = run(["bash", SLURM], env={**slurm_env, "DRY_RUN": "1", "WORKDIR": ""})
  assert r.returncode != 0 and "WORKDIR" in r.stderr


# -------------------------------------------------------------------------- sweep.py

def sweep(*args, env=None):
  return run([sys.executable, SWEEP, *args], env=env)


def test_sweep_dry_run_is_cartesian_product_with_quoting(tmp_path):
  root = str(tmp_path / "sw")
  r = sweep("--dry-run", "--config=configs/base.py", f"--workdir_root={root}",
            "--grid", "model.connector.method=parcel,m3,mqt", "--grid", "seed=0,1",
            "--grid", "model.connector.budgets=16,|(16, 64)", "--set", "train.num_steps=2000")
  assert r.returncode == 0, r.stderr
  out = lines(r.stdout)
  assert len(out) == 3 * 2 * 2
  argvs = [shlex.split(l) for l in out]
  assert all(a[:3] == ["python", "-m", "parcel_jax.train"] for a in argvs)
  workdirs = [a[4] for a in argvs]
  assert len(set(workdirs)) == len(out)
  combos = {(a[6], a[7], a[8]) for a in argvs}
  assert len(combos) == 12
  first = argvs[0]
  assert first[3:] == ["--config=configs/base.py", f"--workdir={root}/method=parcel,seed=0,budgets=16",
                       "--config.train.num_steps=2000", "--config.model.connector.method=parcel",
                       "--config.seed=0", "--config.model.connector.budgets=16,"]
  assert argvs[1][-1] == TUPLE and argvs[1][4].endswith("budgets=16-64")
  assert f"'{TUPLE}'" in out[1]  # shell-quoted, so it survives as one argument


def test_sweep_preset_reproduction(tmp_path):
  r = sweep("--dry-run", "--preset=reproduction", f"--workdir_root={tmp_path}")
  assert r.returncode == 0, r.stderr
  argvs = [shlex.split(l) for l in lines(r.stdout)]
  assert len(argvs) == (4 + 2) * 3
  names = [os.path.basename(a[4].split("=", 1)[1]) for a in argvs]
  assert len(set(names)) == 18
  assert "method=m3,budgets=16,seed=2" in names and "method=none,seed=0" in names
  specialist = argvs[names.index("method=m3,budgets=64,seed=1")]
  assert "--config.model.connector.budgets=64," in specialist


def test_sweep_preset_study_runs_every_variant_from_its_seeds_stage1(tmp_path):
  r = sweep("--dry-run", "--preset=study", f"--workdir_root={tmp_path}/s2",
            "--set", f"init.stage1_workdir={tmp_path}/s1/seed={{seed}}")
  assert r.returncode == 0, r.stderr
  argvs = [shlex.split(l) for l in lines(r.stdout)]
  names = [os.path.basename(a[4].split("=", 1)[1]) for a in argvs]
  assert len(argvs) == len(set(names)) == 15 * 3
  for want in ("method=m3,sampling=all_scales,seed=1", "method=mqt,key_mode=pos_only,seed=0",
               "method=parcel,routing=fixed4x4,seed=2", "method=mqt,extra_self_attn=True,seed=1",
               "method=downsample,seed=0", "method=none,seed=2"):
    assert want in names, want
  for a in argvs:
    seed = next(x for x in a if x.startswith("--config.seed=")).split("=")[1]
    assert f"--config.init.stage1_workdir={tmp_path}/s1/seed={seed}" in a


def test_sweep_set_templates_point_stage2_runs_at_their_seeds_stage1(tmp_path):
  r = sweep("--dry-run", f"--workdir_root={tmp_path}/s2", "--grid", "model.connector.method=parcel,m3",
            "--grid", "seed=0,2", "--set", f"init.stage1_workdir={tmp_path}/s1/seed={{seed}}")
  assert r.returncode == 0, r.stderr
  argvs = [shlex.split(l) for l in lines(r.stdout)]
  assert len(argvs) == 4
  for a in argvs:
    seed = next(x for x in a if x.startswith("--config.seed=")).split("=")[1]
    assert f"--config.init.stage1_workdir={tmp_path}/s1/seed={seed}" in a
  r = sweep("--dry-run", f"--workdir_root={tmp_path}", "--grid", "seed=0,1",
            "--set", "init.stage1_workdir=w/{method}")
  assert r.returncode == 2 and "{method} names no swept key" in r.stderr


def test_sweep_unknown_key_exits_2_and_names_it(tmp_path):
  for args in (["--grid", "model.connector.methd=parcel,m3"], ["--set", "train.nope=1"]):
    r = sweep("--dry-run", f"--workdir_root={tmp_path}", "--grid", "seed=0,1", *args)
    key = args[1].split("=")[0]
    assert r.returncode == 2
    assert f"unknown config key '{key}'" in r.stderr and r.stdout == ""
  r = sweep("--dry-run", f"--workdir_root={tmp_path}", "--grid", "seed=0,x")
  assert r.returncode == 2 and "--config.seed=x" in r.stderr


def test_sweep_tpu_pod_and_slurm_commands_keep_tuples(tmp_path, slurm_env):
  # tpu_pod: the sweep's line, run with tpu_pod.sh's own --dry-run, reaches the workers intact.
  r = sweep("--dry-run", "--launcher=tpu_pod", "--launcher_args=--dry-run --tpu=pod --zone=z",
            "--workdir_root=gs://bucket/sw", "--grid", "model.connector.budgets=(16, 64)|16,")
  assert r.returncode == 0, r.stderr
  first, _ = lines(r.stdout)
  pod = run(shlex.split(first))
  assert pod.returncode == 0, pod.stderr
  _, cmd = remote_command(lines(pod.stdout)[0])
  assert shlex.split(cmd)[-3:] == ["--workdir=gs://bucket/sw/budgets=16-64", "--distributed", TUPLE]
  # slurm: `env CONFIG=.. WORKDIR=.. sbatch ...`; a fake sbatch runs the script in dry-run mode.
  bin_dir = tmp_path / "bin"
  write_exe(bin_dir / "sbatch", """
      #!/bin/bash
      while [[ "$1" == --* ]]; do shift; done
      DRY_RUN=1 exec bash "$@"
  """)
  r = sweep("--launcher=slurm", f"--workdir_root={tmp_path}/sw", "--grid", "seed=3",
            "--set", "model.connector.budgets=16,", env=slurm_env)
  assert r.returncode == 0, r.stderr
  (srun,) = lines(r.stdout)
  assert shlex.split(srun)[-5:] == [f"--workdir={tmp_path}/sw/seed=3",
                                    "--coordinator_address=gpu-node-07:24242", "--num_processes=2",
                                    "--config.model.connector.budgets=16,", "--config.seed=3"]


def test_sweep_local_resumes_and_stops_on_failure(tmp_path):
  log = tmp_path / "calls.jsonl"
  stub = write_exe(tmp_path / "fake_train.py", f"""
      import json, os, sys
      args = dict(a.split("=", 1) for a in sys.argv[3:])  # after: -m parcel_jax.train
      with open({str(log)!r}, "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
      if os.environ.get("FAIL_SEED") == args["--config.seed"]:
        sys.exit(3)
      with open(os.path.join(args["--workdir"], "eval.json"), "w") as f:
        f.write("{{}}")
  """)
  root = tmp_path / "sw"
  (root / "seed=1").mkdir(parents=True)
  (root / "seed=1" / "eval.json").write_text("{}")
  for seed in range(4):
    (root / f"seed={seed}").mkdir(exist_ok=True)  # train creates it; the stub does not
  python = f"{shlex.quote(sys.executable)} {shlex.quote(str(stub))}"
  args = ["--python", python, f"--workdir_root={root}", "--grid", "seed=0,1,2,3"]

  r = sweep(*args, env={"FAIL_SEED": "2"})  # seed=1 is done; seed=2 "is preempted"
  assert r.returncode == 3, r.stderr
  calls = [json.loads(l) for l in log.read_text().splitlines()]
  assert [c[-1] for c in calls] == ["--config.seed=0", "--config.seed=2"]
  assert calls[0][:3] == ["-m", "parcel_jax.train", "--config=configs/base.py"]

  dry = sweep("--dry-run", *args)  # what is left: seeds 2 and 3
  assert [shlex.split(l)[-1] for l in lines(dry.stdout)] == ["--config.seed=2", "--config.seed=3"]
  assert "skip seed=0" in dry.stderr and "skip seed=1" in dry.stderr

  log.unlink()
  r = sweep(*args)
  assert r.returncode == 0, r.stderr
  assert [json.loads(l)[-1] for l in log.read_text().splitlines()] == [
      "--config.seed=2", "--config.seed=3"]
  log.unlink()
  assert sweep(*args).returncode == 0 and not log.exists()  # everything done: nothing runs


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs this process may use")
def test_sweep_parallel_pins_each_run_to_its_own_cpu(tmp_path):
  stub = write_exe(tmp_path / "fake_train.py", """
      import json, os, sys, time
      args = dict(a.split("=", 1) for a in sys.argv[3:])
      if args["--config.seed"] == "3":
        sys.exit(5)
      time.sleep(0.5)  # long enough that two runs overlap
      print("training", args["--config.seed"])
      with open(os.path.join(args["--workdir"], "eval.json"), "w") as f:
        json.dump({"cpus": sorted(os.sched_getaffinity(0)), "xla": os.environ["XLA_FLAGS"],
                   "t": [time.time() - 0.5, time.time()]}, f)
  """)
  root = tmp_path / "sw"
  for seed in range(5):
    (root / f"seed={seed}").mkdir(parents=True)
  python = f"{shlex.quote(sys.executable)} {shlex.quote(str(stub))}"
  r = sweep("--python", python, f"--workdir_root={root}", "--grid", "seed=0,1,2", "--parallel=2",
            env={"XLA_FLAGS": "--xla_dump_to=/nowhere"})
  assert r.returncode == 0, r.stderr
  done = [json.loads((root / f"seed={s}" / "eval.json").read_text()) for s in range(3)]
  assert all(len(d["cpus"]) == 1 for d in done)
  assert done[0]["cpus"] != done[1]["cpus"]  # the first two start together on different CPUs
  assert done[0]["t"][0] < done[1]["t"][1] and done[1]["t"][0] < done[0]["t"][1]  # they overlap
  for d in done:
    assert d["xla"].startswith("--xla_dump_to=/nowhere ") and "intra_op_parallelism_threads=1" in d["xla"]
  assert (root / "seed=2.log").read_text().strip() == "training 2"

  # seed 3 fails: the run going beside it finishes, nothing new starts, its status comes back
  r = sweep("--python", python, f"--workdir_root={root}", "--grid", "seed=0,1,2,3,4,5",
            "--parallel=2")
  assert r.returncode == 5, r.stderr
  assert "run seed=3 exited with status 5" in r.stderr
  assert (root / "seed=4" / "eval.json").exists() and not (root / "seed=5.log").exists()
  assert sweep("--python", python, f"--workdir_root={root}", "--grid", "seed=0",
               "--parallel=2", "--launcher=slurm").returncode == 2
