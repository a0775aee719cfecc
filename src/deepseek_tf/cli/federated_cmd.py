"""`deepseek-tf federated`: federated training over non-IID clients (the brief's 8.2).

Options map onto the config's `federated` section (`--set federated.KEY=VALUE` works
too); clients train with the `train` section (batch size, learning rate, precision).
Parses, calls `deepseek_tf.api.training.federated` and prints its summary.
"""

from __future__ import annotations

from pathlib import Path

from deepseek_tf.cli.common import add_config_args, api_function, keywords

API = "deepseek_tf.api.training:federated"
FLAGS = {  # flag -> (type, help); the dest is the federated key of the same name
    "--clients": (int, "clients made from the corpus"),
    "--partition": (str, "iid | by-speaker | dirichlet:ALPHA | by-file"),
    "--rounds": (int, "federated rounds"),
    "--clients-per-round": (int, "clients sampled per round (at most --clients)"),
    "--local-steps": (int, "each client's optimizer steps per round"),
    "--algorithm": (str, "fedavg | fedprox:MU | fedadam | fedyogi"),
    "--server-learning-rate": (float, "server step (fedavg: 1)"),
    "--server-beta1": (float, "fedadam/fedyogi first moment"),
    "--server-beta2": (float, "fedadam/fedyogi second moment"),
    "--server-tau": (float, "fedadam/fedyogi adaptivity"),
    "--dp-clip": (float, "client-level DP: clip each update to this L2 norm"),
    "--dp-noise-multiplier": (float, "DP noise std / clip"),
    "--dp-delta": (float, "DP delta (default min(1e-5, 1/clients))"),
    "--min-clients": (int, "fewest usable updates for a round to count"),
    "--round-timeout": (float, "seconds to wait for a round's clients"),
    "--eval-every": (int, "rounds between global validation losses"),
    "--engine": (str, "inprocess | flower (the [federated] extra)"),
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
    for flag, (kind, text) in FLAGS.items():
        parser.add_argument(flag, type=kind, help=f"{text} (default: the config's)")
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
    parser.set_defaults(func=run, api=API)


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
    summary = api_function(args.api)(**keywords(args))
    if args.prepare_only:
        print(deployment_help(Path(summary["run_dir"]), summary["clients"]))
        return 0
    print(f"[federated] done: {summary['rounds']} rounds in {summary['seconds']} s, "
          f"checkpoint {summary['checkpoint']}")  # fmt: skip
    return 0
