source .device/prep.sh
find fewstep nodes bench testing -name "*.py" -not -path "*/out/*" | sort | xargs sha256sum | sha256sum > $OUT/tree-hash.txt
python3 bench/server_bench.py --phases cycle --label cycle --out bench/out/sb > $OUT/sb-cycle.txt 2>&1; echo "cycle rc=$?" >> $OUT/sb-cycle.txt
cp bench/out/sb/results-cycle*.json $OUT/ 2>/dev/null
grep -c "" bench/out/sb/server-cycle*.log > $OUT/logcount.txt 2>&1
grep -iE "fatal|terminate|Traceback|error" bench/out/sb/server-cycle*.log | head -20 > $OUT/cycle-errors.txt 2>&1
