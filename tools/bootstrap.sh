# Sourced by tools/test and tools/demo: make a fresh machine ready, quietly and only once.
# Creates .venv with dbguard and its test dependencies (re-installed when pyproject.toml
# changes), and, as root, installs the system packages the suite needs when they are missing.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
  echo "dbguard needs Python 3.11 or newer (python3 was not found)" >&2
  exit 1
fi

need_apt=()
command -v unshare >/dev/null || need_apt+=(util-linux)
for pkg in "${DBGUARD_APT_PACKAGES[@]:-}"; do
  [ -n "$pkg" ] && ! dpkg -s "$pkg" >/dev/null 2>&1 && need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing system packages: ${need_apt[*]}" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "missing system packages (${need_apt[*]}); tests that need them will skip and say why" >&2
  fi
fi

stamp="$venv/.installed-$(sha256sum "$repo/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up $venv (first run only)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q -e "$repo[test]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
