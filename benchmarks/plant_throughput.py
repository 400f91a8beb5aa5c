"""Throughput of the compiled UVA/Padova plant and of the ``twinloop/T1D-v0`` environments.

Prints ONE JSON object to stdout (progress goes to stderr)::

    .venv/bin/python benchmarks/plant_throughput.py
    .venv/bin/python benchmarks/plant_throughput.py --vs-simglucose \
        --simglucose-python /tmp/sgvenv/bin/python
    .venv/bin/python benchmarks/plant_throughput.py --quick      # smoke test

Measured (every figure is the best of ``--repeats`` samples after a warm-up call, timed with
``time.perf_counter``; a sample repeats the call until it lasts ``--min-sample-s``):

* ``plant``: :func:`twinloop.plant.glucose.uva_padova.simulate` of one day (1440 one-minute steps)
  of reference scenario A (meals 45/70/80 g at 07:00/12:00/18:00 eaten at 5 g/min; insulin = basal
  ``u2ss·BW/6000`` U/min every minute + a ``carbs/CR`` U bolus within each meal minute) for
  batches of 1 (adult#001), 30 (the cohort) and 1000 (the 30 tiled) patients, in patient-days/s,
  on one core (``one_core``: ``numba.set_num_threads(1)``, ``parallel=False``, the serial
  compiled loop; ``one_core_prange``: one thread, ``parallel=True``, the ``prange`` kernel) and
  on both cores (``both_cores``: ``numba.set_num_threads(2)``, ``parallel=True``). The targets
  use ``one_core`` (what ``simulate`` runs on one thread) and ``both_cores``.
  ``single_patient_day`` is the wall time of one ``simulate`` call for one patient-day
  (validation and allocation included) and of the bare
  :func:`twinloop.plant.glucose.uva_padova.advance` kernel. ``two_days_1000`` is 1000 patients over
  two days of scenario A: the gastric-emptying ``tanh`` terms are skipped until a patient's first
  meal, so day 1 (7 fasting hours) is cheaper than later days and this figure is closer to the cost
  of long runs.
* ``env``: ``gymnasium.make("twinloop/T1D-v0")`` (default config: adult#001, random meals,
  5-min steps; with Gymnasium's ``OrderEnforcing``/``PassiveEnvChecker`` wrappers) stepped with
  the constant action = the patient's basal rate (U/h) and reset when an episode ends, in
  steps/s (also unwrapped, to show the wrappers' cost). ``vector``:
  ``gymnasium.make_vec(..., num_envs=1000, vectorization_mode="vector_entry_point",
  patients=("all",))`` stepped with each env's basal rate (no boluses, so many envs end early
  above 600 mg/dL and are autoreset one by one) for one whole episode: 288 steps + the
  next-step autoreset step; env-steps/s = 1000 x vector steps/s over those 289 ``step`` calls.
  ``no_reset_env_steps_per_s`` counts only the calls in which no env was being reset (plant and
  bookkeeping without the per-env Python reset), ``autoresets_per_episode`` and
  ``seconds_in_steps_with_autoresets`` show what the resets cost. ``step_kernel_parallel``
  says whether the environments' compiled step has a parallel path (if not, ``one_core`` and
  ``both_cores`` run the same single-threaded code).
* ``simglucose`` (``--vs-simglucose``): ``benchmarks/simglucose_day.py`` in a subprocess
  (``--simglucose-python``, default this interpreter) times simglucose 0.2.11 on one patient-day
  of scenario A for adult#001, stepping ``T1DPatient`` every minute directly (``direct``, as the
  reference trajectories were made; the ratios use it) and through ``T1DSimEnv`` (``env``).

``cpu_over_wall`` (process CPU time / wall time of the best sample) flags contention: about 1
for one core and about 2 for both when the machine is otherwise idle (OpenMP workers also spin
while waiting, so 2 is reached even with little work).
``contention.<section>.other_processes_cpu_s`` is the CPU time the rest of the machine used
while that section ran and ``steal_s`` the time the hypervisor took from this VM (both from
``/proc/stat``); figures taken while either is large are not trustworthy, the both-core ones
least of all. Noise from other tenants of the host is not visible in either.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

MINUTES_PER_DAY = 1440
MEALS_A: tuple[tuple[int, float], ...] = ((420, 45.0), (720, 70.0), (1080, 80.0))
BATCH_SIZES = (1, 30, 1000)
VECTOR_ENVS = 1000
HERE = Path(__file__).resolve().parent

TARGETS = {
    "plant_1000_one_core_patient_days_per_s": 2000.0,
    "plant_1000_both_cores_patient_days_per_s": 3500.0,
    "t1d_env_steps_per_s": 20000.0,
    "vector_1000_env_steps_per_s_one_core": 500000.0,
    "vector_1000_env_steps_per_s_both_cores": 500000.0,
    "single_patient_day_speedup_vs_simglucose": 1000.0,
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn: Callable[[], object], repeats: int, min_sample_s: float) -> dict[str, float]:
    """Best-of-``repeats`` seconds per call of ``fn`` (after a warm-up and a calibration call)."""
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()  # calibration
    one = max(time.perf_counter() - t0, 1e-9)
    calls = max(1, math.ceil(min_sample_s / one))
    per_call: list[float] = []
    cpu_ratio: list[float] = []
    for _ in range(repeats):
        c0 = time.process_time()
        w0 = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = time.perf_counter() - w0
        per_call.append(wall / calls)
        cpu_ratio.append((time.process_time() - c0) / wall)
    best = int(np.argmin(per_call))
    return {
        "best_s": per_call[best],
        "median_s": float(np.median(per_call)),
        "calls_per_sample": calls,
        "samples": repeats,
        "cpu_over_wall": round(cpu_ratio[best], 3),
    }


def scenario_a_inputs(
    basal_u_per_min: Sequence[float], carb_ratio: Sequence[float]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Insulin (U/min) and meal (g) arrays ``(N, 1440)`` of scenario A."""
    n = len(basal_u_per_min)
    insulin = np.repeat(np.asarray(basal_u_per_min, dtype=np.float64)[:, None], MINUTES_PER_DAY, 1)
    meals = np.zeros((n, MINUTES_PER_DAY))
    cr = np.asarray(carb_ratio, dtype=np.float64)
    for minute, grams in MEALS_A:
        meals[:, minute] = grams
        insulin[:, minute] += grams / cr
    return insulin, meals


def cpu_seconds() -> tuple[float, float, float]:
    """CPU seconds so far: (machine busy, stolen by the hypervisor, this process + children)."""
    import resource

    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(v) for v in fields]
        hz = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal guest guest_nice (guest is in user)
        machine = sum(ticks[i] for i in (0, 1, 2, 5, 6)) / hz
        steal = ticks[7] / hz
    except (OSError, ValueError, IndexError):
        machine = steal = float("nan")
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        own += r.ru_utime + r.ru_stime
    return machine, steal, own


class Contention:
    """CPU time used by other processes while each section of the benchmark ran."""

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, float]] = {}
        self._start: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def start(self) -> None:
        self._start = (time.perf_counter(), *cpu_seconds())

    def stop(self, name: str) -> None:
        wall0, machine0, steal0, own0 = self._start
        machine1, steal1, own1 = cpu_seconds()
        self.sections[name] = {
            "wall_s": round(time.perf_counter() - wall0, 3),
            "own_cpu_s": round(own1 - own0, 3),
            "other_processes_cpu_s": round((machine1 - machine0) - (own1 - own0), 3),
            "steal_s": round(steal1 - steal0, 3),
        }


def machine_info() -> dict[str, Any]:
    import numba

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for pkg in ("numpy", "numba", "llvmlite", "scipy", "gymnasium", "twinloop"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numba_max_threads": numba.config.NUMBA_NUM_THREADS,  # type: ignore[attr-defined]
        "versions": versions,
    }


def bench_plant(repeats: int, min_sample_s: float, both_threads: int) -> dict[str, Any]:
    import numba

    from twinloop.plant.glucose.patients import parameter_matrix, resolve_patients
    from twinloop.plant.glucose.uva_padova import N_MEAL_STATE, advance, simulate

    cohort = resolve_patients(cohorts=["all"])
    adult1 = resolve_patients(["adult#001"])
    batches = {1: adult1, 30: cohort, 1000: tuple(cohort[i % 30] for i in range(1000))}
    out: dict[str, Any] = {"batches": {}}
    modes = {
        "one_core": (1, False),
        "one_core_prange": (1, True),
        "both_cores": (both_threads, True),
    }
    log("plant: compiling / loading the numba cache ...")
    for threads, parallel in modes.values():
        numba.set_num_threads(threads)
        ins, meals = scenario_a_inputs([adult1[0].basal_u_per_min], [adult1[0].carb_ratio_g_per_u])
        simulate(adult1, ins, meals, parallel=parallel)
    out["threading_layer"] = numba.threading_layer()
    for n, patients in batches.items():
        ins, meals = scenario_a_inputs(
            [p.basal_u_per_min for p in patients], [p.carb_ratio_g_per_u for p in patients]
        )
        row: dict[str, Any] = {}
        for mode, (threads, parallel) in modes.items():
            numba.set_num_threads(threads)

            def call(
                patients: Sequence[Any] = patients,
                ins: NDArray[np.float64] = ins,
                meals: NDArray[np.float64] = meals,
                parallel: bool = parallel,
            ) -> object:
                return simulate(patients, ins, meals, parallel=parallel)

            t = timed(call, repeats, min_sample_s)
            t["threads"] = threads
            t["parallel"] = parallel
            t["patient_days_per_s"] = n / t["best_s"]
            row[mode] = t
            log(f"plant N={n:5d} {mode:10s}: {t['patient_days_per_s']:10.1f} patient-days/s")
        row["both_over_one"] = (
            row["both_cores"]["patient_days_per_s"] / row["one_core"]["patient_days_per_s"]
        )
        out["batches"][str(n)] = row

    # Two days of scenario A for 1000 patients. Until a patient's first meal, D-bar = 0 and the
    # right-hand side skips the two tanh of gastric emptying; day 1 has 7 fasting hours, day 2
    # none, so this is closer to the cost of long runs.
    patients = batches[1000]
    ins1, meals1 = scenario_a_inputs(
        [p.basal_u_per_min for p in patients], [p.carb_ratio_g_per_u for p in patients]
    )
    ins2, meals2 = np.tile(ins1, 2), np.tile(meals1, 2)
    two: dict[str, Any] = {"patients": 1000, "days": 2}
    for mode, (threads, parallel) in modes.items():
        numba.set_num_threads(threads)

        def call2(parallel: bool = parallel) -> object:
            return simulate(patients, ins2, meals2, parallel=parallel)

        t = timed(call2, repeats, min_sample_s)
        t["patient_days_per_s"] = 2000 / t["best_s"]
        two[mode] = t
        log(f"plant N= 1000 x 2 days {mode:10s}: {t['patient_days_per_s']:10.1f} patient-days/s")
    out["two_days_1000"] = two

    # single patient-day: public simulate() (already timed as N=1 one core) and the bare kernel
    numba.set_num_threads(1)
    p = adult1[0]
    ins, meals = scenario_a_inputs([p.basal_u_per_min], [p.carb_ratio_g_per_u])
    params = parameter_matrix(adult1)
    x0 = np.array([p.x0], dtype=np.float64)
    x = x0.copy()
    meal_state = np.zeros((1, N_MEAL_STATE))
    carbs = np.empty((1, MINUTES_PER_DAY))
    rate = np.full(1, 5.0)

    def kernel() -> None:
        x[:] = x0
        meal_state[:] = 0.0
        advance(x, meal_state, params, ins, meals, rate, carbs_out=carbs, parallel=False)

    tk = timed(kernel, repeats, min_sample_s)
    traj = simulate(adult1, ins, meals, parallel=False)
    out["single_patient_day"] = {
        "patient": p.name,
        "simulate_s": out["batches"]["1"]["one_core"]["best_s"],
        "advance_kernel_s": tk["best_s"],
        "advance_kernel_timing": tk,
        "bg_final_mg_dl": float(traj.bg_mg_dl[0, -1]),
    }
    out["_adult1_bg"] = traj.bg_mg_dl[0]
    return out


def bench_env(repeats: int, min_sample_s: float) -> dict[str, Any]:
    import gymnasium as gym

    from twinloop import plant
    from twinloop.plant.glucose.patients import get_patient

    env = gym.make(plant.T1D_ID)
    cfg = env.unwrapped.config  # type: ignore[attr-defined]
    patient = get_patient(cfg.patients[0])
    action = np.array([patient.basal_u_per_h], dtype=np.float32)
    steps_per_call = cfg.n_steps
    out: dict[str, Any] = {
        "id": plant.T1D_ID,
        "patient": patient.name,
        "scenario": cfg.scenario,
        "control_period_min": cfg.control_period_min,
        "action_u_per_h": float(action[0]),
        "wrappers": str(env),
    }
    for label, e in (("wrapped", env), ("unwrapped", env.unwrapped)):
        e.reset(seed=0)
        episodes = [0]

        def run(e: gym.Env[Any, Any] = e, episodes: list[int] = episodes) -> None:
            for _ in range(steps_per_call):
                _, _, term, trunc, _ = e.step(action)
                if term or trunc:
                    e.reset()
                    episodes[0] += 1

        t = timed(run, repeats, min_sample_s)
        t["steps_per_call"] = steps_per_call
        t["steps_per_s"] = steps_per_call / t["best_s"]
        t["episode_ends_seen"] = episodes[0]
        out[label] = t
        log(f"T1D-v0 {label:9s}: {t['steps_per_s']:10.0f} steps/s")
    out["steps_per_s"] = out["wrapped"]["steps_per_s"]
    env.close()
    return out


def bench_vector(repeats: int, both_threads: int) -> dict[str, Any]:
    import gymnasium as gym
    import numba

    from twinloop import plant
    from twinloop.plant.glucose.patients import get_patient

    venv = gym.make_vec(
        plant.T1D_ID,
        num_envs=VECTOR_ENVS,
        vectorization_mode="vector_entry_point",
        patients=("all",),
    )
    _, info = venv.reset(seed=0)
    basal = {name: get_patient(name).basal_u_per_h for name in set(info["patient"])}
    actions = np.array([[basal[name]] for name in info["patient"]], dtype=np.float32)
    n_steps = venv.unwrapped.config.n_steps  # type: ignore[attr-defined]
    out: dict[str, Any] = {
        "num_envs": VECTOR_ENVS,
        "type": type(venv).__name__,
        "patients": "all 30 tiled (env i -> patient i mod 30)",
        "action": "each env's patient basal rate (U/h), constant",
        "steps_per_episode": n_steps,
        "step_kernel_parallel": bool(venv.unwrapped._batch._parallel),  # type: ignore[attr-defined]
    }
    for mode, threads in (("one_core", 1), ("both_cores", both_threads)):
        numba.set_num_threads(threads)
        venv.reset(seed=0)
        for _ in range(3):  # warm-up
            venv.step(actions)
        episode_s: list[float] = []
        no_reset_s: list[tuple[float, int]] = []
        reset_step_s: list[float] = []
        reset_s: list[float] = []
        cpu: list[float] = []
        resets = 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            venv.reset(seed=0)  # same meals and noise every repeat: identical work
            reset_s.append(time.perf_counter() - t0)
            step_times = np.empty(n_steps + 1)
            resetting = np.zeros(n_steps + 1, dtype=np.int64)
            pending = np.zeros(VECTOR_ENVS, dtype=np.bool_)
            c0 = time.process_time()
            w0 = time.perf_counter()
            prev = w0
            for k in range(n_steps + 1):
                resetting[k] = int(pending.sum())
                _, _, term, trunc, _ = venv.step(actions)
                now = time.perf_counter()
                step_times[k] = now - prev
                prev = now
                pending = term | trunc
            wall = prev - w0
            episode_s.append(wall)
            quiet = resetting == 0
            no_reset_s.append((float(step_times[quiet].sum()), int(quiet.sum())))
            reset_step_s.append(float(step_times[~quiet].sum()))
            cpu.append((time.process_time() - c0) / wall)
            resets = int(resetting.sum())
        best = int(np.argmin(episode_s))
        quiet_s, quiet_n = min(no_reset_s)
        r = {
            "threads": threads,
            "episode_s": episode_s[best],
            "episode_s_all": episode_s,
            "vector_steps_per_s": (n_steps + 1) / episode_s[best],
            "env_steps_per_s": VECTOR_ENVS * (n_steps + 1) / episode_s[best],
            "no_reset_env_steps_per_s": VECTOR_ENVS * quiet_n / quiet_s,
            "steps_with_autoresets": (n_steps + 1) - quiet_n,
            "autoresets_per_episode": resets,
            "seconds_in_steps_with_autoresets": reset_step_s[best],
            "reset_all_s": min(reset_s),
            "cpu_over_wall": round(cpu[best], 3),
        }
        out[mode] = r
        log(
            f"vector x{VECTOR_ENVS} {mode:10s}: {r['env_steps_per_s']:12.0f} env-steps/s "
            f"({r['no_reset_env_steps_per_s']:.0f} in steps without autoresets)"
        )
    venv.close()
    return out


def bench_simglucose(python: str, repeats: int) -> dict[str, Any]:
    cmd = [python, str(HERE / "simglucose_day.py"), "--patient", "adult#001"]
    cmd += ["--repeats", str(repeats), "--modes", "direct,env"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log(f"simglucose: {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        return {"importable": False, "error": f"cannot run {python}: {exc}"}
    sys.stderr.write(proc.stderr[-2000:] if proc.returncode else "")
    try:
        res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {
            "importable": False,
            "error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-500:]}",
        }
    res["python_executable"] = python
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="samples per figure (default 5)")
    ap.add_argument("--min-sample-s", type=float, default=None, help="default 0.5 (quick: 0.05)")
    ap.add_argument("--vs-simglucose", action="store_true", help="also time simglucose 0.2.11")
    ap.add_argument(
        "--simglucose-python",
        default=sys.executable,
        help="interpreter with simglucose installed (default: this one)",
    )
    ap.add_argument("--simglucose-repeats", type=int, default=None, help="default 3 (quick: 1)")
    ap.add_argument("--skip-env", action="store_true", help="only the plant (and simglucose)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    min_sample_s = args.min_sample_s or (0.05 if args.quick else 0.5)
    sg_repeats = args.simglucose_repeats or (1 if args.quick else 3)

    import numba

    both_threads = min(2, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    result: dict[str, Any] = {
        "benchmark": "plant_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "repeats": repeats,
        "min_sample_s": min_sample_s,
        "machine": machine_info(),
        "loadavg_start": os.getloadavg(),
    }
    contention = Contention()
    contention.start()
    plant_res = bench_plant(repeats, min_sample_s, both_threads)
    contention.stop("plant")
    adult1_bg = plant_res.pop("_adult1_bg")
    result["machine"]["numba_threading_layer"] = plant_res.pop("threading_layer")
    result["plant"] = plant_res
    if not args.skip_env:
        contention.start()
        result["env"] = bench_env(repeats, min_sample_s)
        contention.stop("env")
        contention.start()
        result["vector"] = bench_vector(repeats, both_threads)
        contention.stop("vector")
    if args.vs_simglucose:
        contention.start()
        sg = bench_simglucose(args.simglucose_python, sg_repeats)
        contention.stop("simglucose")
        if sg.get("importable") and "direct" in sg:
            tl_day = plant_res["single_patient_day"]["simulate_s"]
            tl_1000 = plant_res["batches"]["1000"]["one_core"]["patient_days_per_s"]
            for mode in ("direct", "env"):
                if mode in sg and "bg_mg_dl" in sg[mode]:
                    bg = np.asarray(sg[mode].pop("bg_mg_dl"))
                    sg[mode]["max_abs_bg_diff_vs_twinloop_mg_dl"] = float(
                        np.max(np.abs(bg - adult1_bg))
                    )
            sg_day = sg["direct"]["best_s"]
            sg["comparison_mode"] = "direct"
            sg["single_patient_day_ratio"] = sg_day / tl_day
            sg["single_patient_day_ratio_vs_advance_kernel"] = (
                sg_day / plant_res["single_patient_day"]["advance_kernel_s"]
            )
            sg["per_core_throughput_ratio_batch1"] = (
                plant_res["batches"]["1"]["one_core"]["patient_days_per_s"] * sg_day
            )
            sg["per_core_throughput_ratio_batch1000"] = tl_1000 * sg_day
            if "env" in sg:
                sg["single_patient_day_ratio_env"] = sg["env"]["best_s"] / tl_day
            log(f"simglucose/twinloop single patient-day: {sg['single_patient_day_ratio']:.0f}x")
        result["simglucose"] = sg
    result["loadavg_end"] = os.getloadavg()
    result["contention"] = contention.sections

    b = plant_res["batches"]["1000"]
    measured: dict[str, float | None] = {
        "plant_1000_one_core_patient_days_per_s": b["one_core"]["patient_days_per_s"],
        "plant_1000_both_cores_patient_days_per_s": b["both_cores"]["patient_days_per_s"],
        "t1d_env_steps_per_s": result["env"]["steps_per_s"] if "env" in result else None,
        "vector_1000_env_steps_per_s_one_core": (
            result["vector"]["one_core"]["env_steps_per_s"] if "vector" in result else None
        ),
        "vector_1000_env_steps_per_s_both_cores": (
            result["vector"]["both_cores"]["env_steps_per_s"] if "vector" in result else None
        ),
        "single_patient_day_speedup_vs_simglucose": (
            result.get("simglucose", {}).get("single_patient_day_ratio")
        ),
    }
    result["targets"] = {
        k: {
            "target": v,
            "measured": measured[k],
            "met": None if measured[k] is None else bool(measured[k] >= v),  # type: ignore[operator]
        }
        for k, v in TARGETS.items()
    }
    print(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
