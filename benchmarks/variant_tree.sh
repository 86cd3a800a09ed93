#!/usr/bin/env bash
# A copy of a source snapshot with one line changed, for an A/B of one constant on one machine
# (benchmarks/ab_run.sh BASE VARIANT): fails, leaving no copy, when the expression changes nothing.
#   bash benchmarks/variant_tree.sh SRC_TREE DST_TREE FILE SED_EXPRESSION
#   e.g. bash benchmarks/variant_tree.sh .snap_now .snap_exp shards/layers/pdl.py \
#       's/^PDL_MAX_ROWS = 8$/PDL_MAX_ROWS = 512/'
set -eu
src=$1 dst=$2 file=$3 expression=$4
rm -rf "$dst"
cp -r "$src" "$dst"
sed -i "$expression" "$dst/$file"
if cmp -s "$src/$file" "$dst/$file"; then
    rm -rf "$dst"
    echo "variant_tree: '$expression' changed nothing in $file" >&2
    exit 1
fi
diff "$src/$file" "$dst/$file" || true
