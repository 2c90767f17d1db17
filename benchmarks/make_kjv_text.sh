#!/usr/bin/env bash
# Rebuild kvjax/data/kjv_judges.txt (public domain King James Bible, book of Judges) from
# Debian's bible-kjv packages, verse references stripped. Provenance of the shipped file.
set -euo pipefail
tmp=$(mktemp -d)
cd "$tmp"
apt-get download bible-kjv bible-kjv-text
for f in *.deb; do dpkg -x "$f" deb; done
deb/usr/bin/bible -p deb/usr/lib -f -l0 "Judges 1:1-21:25" | sed -E 's/^[A-Za-z0-9]+[0-9]+:[0-9]+ //'
