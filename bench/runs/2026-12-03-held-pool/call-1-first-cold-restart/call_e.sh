source .device/prep.sh
mon() { while true; do { echo "== $(date +%T) $(cat /tmp/phase 2>/dev/null)"; ps -eo pid,ppid,pcpu,rss,nlwp,etimes,args --sort=-pcpu | grep -E "[p]ython|PID" | cut -c1-160 | head -8; nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; } >> $OUT/mon.txt 2>&1; sleep 3; done; }
mon & MON=$!
find fewstep nodes bench testing -name "*.py" -not -path "*/out/*" | sort | xargs sha256sum | sha256sum > $OUT/tree-hash.txt
echo cold > /tmp/phase
python3 bench/server_bench.py --phases first --cold --label cold --runs 40 --out bench/out/sb > $OUT/sb-cold.txt 2>&1; echo "cold rc=$?" >> $OUT/sb-cold.txt
echo restart > /tmp/phase
python3 bench/server_bench.py --phases first --label restart --runs 60 --out bench/out/sb > $OUT/sb-restart.txt 2>&1; echo "restart rc=$?" >> $OUT/sb-restart.txt
kill $MON
cp bench/out/sb/server-*.log bench/out/sb/results-*.json $OUT/ 2>/dev/null
ls -la bench/out/sb > $OUT/ls-sb.txt 2>&1
