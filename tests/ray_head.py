"""A Ray head for the batch tests: a local instance on 127.0.0.1 with N CPUs, no dashboard, no usage statistics.

Run inside a network namespace that has only ``lo`` (test_batch.py starts it under ``unshare -n``). Prints
``{"address": GCS, "pid": PID}`` on one line, keeps the instance until its standard input closes, then stops
it (only the processes this instance started).

    python tests/ray_head.py NUM_CPUS TEMP_DIR
"""

import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray  # noqa: E402 - after the environment it reads at import

if __name__ == "__main__":
    cpus, temp_dir = int(sys.argv[1]), sys.argv[2]
    ray.init(num_cpus=cpus, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
             object_store_memory=80 * 2**20, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    print(json.dumps({"address": ray.get_runtime_context().gcs_address, "pid": os.getpid()}), flush=True)
    sys.stdin.read()  # until the test closes the pipe
    ray.shutdown()
