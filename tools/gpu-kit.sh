#!/bin/bash
# Run here (the 2-core machine, which reaches PyPI) before the device check: what the lent GPU
# machine lacks travels with the call (docs/performance.md#the-prepared-gpu-check).
#   .whl/       vaebench's dependencies missing from the device's image (.library/device/KINDS.md
#               lists what it holds: torch, numpy, pandas, scikit-learn, matplotlib, ...), as
#               CPython 3.12 manylinux wheels; about 36 MB
#   .gpu-data/  MNIST in torchvision's layout, from $VAEBENCH_DATA or ../shared/data; 11 MB
# Both are ignored by git; the device call names them in `carry`.
set -euo pipefail
data=$(realpath "${VAEBENCH_DATA:-$(dirname "$0")/../../shared/data}")
cd "$(dirname "$0")/.."
WHEELS=(
  mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 pydantic==2.13.4
  pydantic-core==2.46.4 annotated-types typing-inspection alembic mako sqlalchemy sqlparse
  flask flask-cors itsdangerous blinker graphene graphql-core graphql-relay gunicorn huey
  skops prettytable wcwidth docker cachetools databricks-sdk google-auth pyasn1 pyasn1-modules
  fastapi starlette uvicorn gitpython gitdb smmap importlib-metadata opentelemetry-api
  opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions python-dotenv
  cryptography cffi pycparser optuna colorlog lazy-importer
)
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
rm -rf .gpu-data && mkdir -p .gpu-data/MNIST/raw
cp "$data"/MNIST/raw/*-ubyte.gz .gpu-data/MNIST/raw/
du -sh .whl .gpu-data
