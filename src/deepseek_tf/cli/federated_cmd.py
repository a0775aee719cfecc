"""`deepseek-tf federated`: federated training over non-IID clients (the brief's 8.2).

Options map onto the config's `federated` section (`--set federated.KEY=VALUE` works
too); clients train with the `train` section (batch size, learning rate, precision).
"""

from __future__ import annotations

import time
from pathlib import Path

from deepseek_tf.cli.common import add_config_args, resolve_config

FLAGS = {  # flag -> (federated key, type, help)
    "--clients": ("clients", int, "clients made from the corpus"),
    "--partition": ("partition", str, "iid | by-speaker | dirichlet:ALPHA | by-file"),
    "--rounds": ("rounds", int, "federated rounds"),
    "--clients-per-round": ("clients_per_round", int, "clients sampled per round"),
    "--local-steps": ("local_steps", int, "each client's optimizer steps per round"),
    "--algorithm": ("algorithm", str, "fedavg | fedprox:MU | fedadam | fedyogi"),
    "--server-learning-rate": ("server_learning_rate", float, "server step (fedavg: 1)"),
    "--server-beta1": ("server_beta1", float, "fedadam/fedyogi first moment"),
    "--server-beta2": ("server_beta2", float, "fedadam/fedyogi second moment"),
    "--server-tau": ("server_tau", float, "fedadam/fedyogi adaptivity"),
    "--dp-clip": ("dp_clip", float, "client-level DP: clip each update to this L2 norm"),
    "--dp-noise-multiplier": ("dp_noise_multiplier", float, "DP noise std / clip"),
    "--dp-delta": ("dp_delta", float, "DP delta (default min(1e-5, 1/clients))"),
    "--min-clients": ("min_clients", int, "fewest usable updates for a round to count"),
    "--round-timeout": ("round_timeout", float, "seconds to wait for a round's clients"),
    "--eval-every": ("eval_every", int, "rounds between global validation losses"),
    "--engine": ("engine", str, "inprocess | flower"),
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "federated",
        help="federated training (FedAvg/FedProx/FedAdam/FedYogi, DP, secure aggregation)",
        description=__doc__.splitlines()[0],
    )
    add_config_args(parser)
    parser.add_argument("--out", help="run directory (default: runs/federated-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    for flag, (key, kind, text) in FLAGS.items():
        parser.add_argument(flag, type=kind, dest=f"fed_{key}", help=text)
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the run directory (config, tokenizer, clients' data) and print how to "
        "train it on a Flower deployment (SuperLink + SuperNodes, `flwr run`)",
    )
    parser.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="pairwise-masked sums: the server never sees one client's update",
    )
    parser.set_defaults(func=run)


def deployment_help(run_dir: Path, clients: int) -> str:
    """The commands that train a prepared run on a Flower deployment."""
    from deepseek_tf.federated import flower_project_dir

    nodes = "\n".join(
        f"flower-supernode --insecure --superlink 127.0.0.1:9190 --port {9194 + k} "
        f"--node-config 'partition-id={k}' &"
        for k in range(clients)
    )
    return f"""prepared {run_dir} ({clients} clients). To train it on Flower processes:
flower-superlink --insecure --host 127.0.0.1 --port 9190 --disable-runtime-dependency-installation &
{nodes}
flwr run {flower_project_dir()} -c 'run-dir="{run_dir}"'  # $FLWR_HOME/config.toml: the SuperLink
"""


def run(args) -> int:
    from deepseek_tf.api import train_federated
    from deepseek_tf.config.loader import apply_overrides
    from deepseek_tf.errors import ConfigError
    from deepseek_tf.rundir import RunDir

    overrides = list(args.overrides)
    for key, _, _ in FLAGS.values():
        value = getattr(args, f"fed_{key}")
        if value is not None:
            overrides.append(f"federated.{key}={value}")
    if args.secure_aggregation:
        overrides.append("federated.secure_aggregation=true")
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        if args.preset or args.config:
            raise ConfigError("--resume continues the run's own config; drop --preset/--config")
        config = apply_overrides(RunDir(args.out).read_config(), overrides)
    else:
        args.overrides = overrides
        config = resolve_config(args)
    out = args.out or f"runs/federated-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = train_federated(config, out, resume=args.resume, prepare_only=args.prepare_only)
    if args.prepare_only:
        print(deployment_help(Path(out).resolve(), summary["clients"]))
        return 0
    print(f"[federated] done: {summary['rounds']} rounds in {summary['seconds']} s, "
          f"checkpoint {summary['checkpoint']}")  # fmt: skip
    return 0
