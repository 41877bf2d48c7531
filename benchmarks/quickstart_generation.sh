#!/bin/bash
# The quickstart sweep with and without generation accuracy, one after the other, each in a fresh folder; then the
# per-trial val/gen_acc of the first, and cfg3f's sentence lengths. Run from the project root.
#   bash benchmarks/quickstart_generation.sh > benchmarks/results/cpu_quickstart_generation.log
set -e
ROOT=$PWD
PY=$ROOT/.venv/bin/python
echo "# $(date -u +%F) $(nproc) CPUs; commit $(git rev-parse --short HEAD)"
for gen in 32 0; do
  W=$(mktemp -d); cp sweeps/quickstart.yaml $W/
  echo "\$ overtok sweep sweeps/quickstart.yaml --set base.train.gen_samples=$gen"
  (cd $W && PYTHONPATH=$ROOT $PY -m overtok sweep quickstart.yaml --set base.train.gen_samples=$gen 2>&1 | grep -E "in all|finished,")
  if [ $gen = 32 ]; then
    (cd $W && $PY -c "
from mlflow.tracking import MlflowClient
c = MlflowClient('sqlite:///results/mlflow.db')
rs = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id]) if r.data.tags.get('overtok.role') == 'trial']
print('val/gen_acc per trial:', sorted(r.data.metrics['val/gen_acc'] for r in rs))
" 2>&1 | grep -v -i warn)
  fi
done
$PY -c "
import random
from overtok.data.cfg import load_grammar, sample_sentence
g, rng = load_grammar('cfg3f'), random.Random(0)
L = sorted(len(sample_sentence(g, rng)) for _ in range(2000))
print(f'cfg3f, 2,000 sentences (random.Random(0)): {L[0]}-{L[-1]} tokens, median {L[1000]}, under 64: {sum(x < 64 for x in L)}')
"
