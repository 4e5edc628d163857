source .device/prep.sh
rm -rf bench/out/sc
TORCHINDUCTOR_CACHE_DIR=$PWD/bench/out/sc-cache python3 bench/server_check.py --frontend-stand-in --runs 20 --flag-sets default disable-cuda-malloc --out $PWD/bench/out/sc > $OUT/sc.txt 2>&1; echo "check rc=$?" >> $OUT/sc.txt
cp bench/out/sc/results.md $OUT/ 2>/dev/null
find bench/out/sc -type f -size -8M \( -name "*.json" -o -name "*.txt" -o -name "*.md" -o -name "*.log" \) -print0 | tar --null -T - -czf $OUT/sc.tgz
