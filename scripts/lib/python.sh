# Sourced by scripts: find_python [MAJOR.MINOR] prints a Python 3.10+ interpreter that runs:
# $PYTHON if set, else that version (on PATH or installed by pyenv), else the newest on PATH.

find_python() {
  local want="${1:-}" candidate candidates=()
  [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
  if [ -n "$want" ]; then
    candidates+=("python$want")
    if command -v pyenv >/dev/null 2>&1; then
      candidates+=("$(pyenv root)"/versions/"$want".*/bin/python"$want")
    fi
  fi
  candidates+=(python3.13 python3.12 python3.11 python3.10 python3)
  for candidate in "${candidates[@]}"; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  echo "no Python 3.10 or newer found" >&2
  return 1
}
