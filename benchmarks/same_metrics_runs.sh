#!/bin/bash
# The runs behind benchmarks/check_same_metrics.py: run at two commits, then compare the dirs pairwise:
#   bash benchmarks/same_metrics_runs.sh <checkout> <outdir>   (each from its own checkout, e.g. a copy at the base commit)
#   python benchmarks/check_same_metrics.py OUT1/a OUT2/a OUT1/b OUT2/b ...   (g2 is a resume: --ignore resumed)
set -e
P=${PYTHON:-python}
cd "$1"; O="$2"; mkdir -p "$O"
$P -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from test_resnet_train import write_images; write_images(Path('$O/images.npz'), n_train=256, n_test=128)"
export OMP_NUM_THREADS=1

C="dataset=synthetic model.widths=[64,64] trainer.epochs=2 trainer.num_threads=1 seed=0 trainer.logging.progress=none"
$P -m hashexp $C hashing=simhash schedule.unit=step schedule.every=20 hydra.run.dir=$O/a > $O/a.log 2>&1
$P -m hashexp $C hashing=simhash schedule=drift schedule.check_every=10 hydra.run.dir=$O/b > $O/b.log 2>&1
$P -m hashexp $C hashing=simhash schedule=gradual schedule.start=5 schedule.end=40 schedule.every=10 hashing.max_error=null hashing.pull.steps=8 hydra.run.dir=$O/c > $O/c.log 2>&1
$P -m hashexp $C hashing=magnitude schedule.unit=step schedule.every=20 hydra.run.dir=$O/d > $O/d.log 2>&1
$P -m hashexp $C hashing=simhash schedule=per_layer schedule.unit=step 'schedule.sites={fc1:{start:10,every:20,threshold:0.8,target_ratio:0.6},fc2:{start:15,every:30}}' hydra.run.dir=$O/e > $O/e.log 2>&1
$P -m hashexp experiment=resnet20_fmnist dataset=npz dataset.path=$O/images.npz 'dataset.augment={crop_padding:2,hflip:false}' trainer.epochs=2 trainer.batch_size=64 trainer.logging.every=2 trainer.logging.progress=none trainer.bn_recalib_batches=3 trainer.num_threads=1 trainer.optimizer.lr=0.05 schedule.unit=step schedule.start=2 schedule.every=3 schedule.max_rehashes=2 hashing.max_error=0.5 seed=0 hydra.run.dir=$O/r > $O/r.log 2>&1
$P -m hashexp $C hashing=simhash schedule.unit=step schedule.every=20 trainer.epochs=3 hydra.run.dir=$O/f > $O/f.log 2>&1
# resume: partial run (1 epoch, checkpoint every 7 steps) then resume into it with 3 epochs
$P -m hashexp $C hashing=simhash schedule.unit=step schedule.every=20 trainer.epochs=1 trainer.checkpoint.every_steps=7 hydra.run.dir=$O/g > $O/g.log 2>&1
$P -m hashexp $C hashing=simhash schedule.unit=step schedule.every=20 trainer.epochs=3 trainer.checkpoint.every_steps=7 trainer.checkpoint.resume=$O/g hydra.run.dir=$O/g2 > $O/g2.log 2>&1
$P -m hashexp $C hashing=simhash schedule=drift schedule.check_every=10 schedule.flip_threshold=0.02 schedule.min_interval=30 hydra.run.dir=$O/b2 > $O/b2.log 2>&1
echo done
