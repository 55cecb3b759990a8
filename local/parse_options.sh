#!/usr/bin/env bash
# Option parsing shared by the stage driver and every corpus's local/data.sh (Kaldi's
# utils/parse_options.sh, in short). Source it after setting the option defaults:
#   . "$root/local/parse_options.sh" "$@"
# `--name value` or `--name=value` sets the variable name (dashes → underscores) that the script
# declared; -h/--help runs the script's usage(), or prints its header comment. An undeclared option is an
# error, unless the script declared an array `extra_args`: then it is collected there, with the
# values that follow it (none, one, or several: argparse's nargs), for a program that checks its
# own options.
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) if declare -F usage >/dev/null; then usage; else sed -n '2,/^set -euo/p' "$0" | sed '$d'; fi
               exit 0 ;;
    --*=*) key="${1%%=*}"; value="${1#*=}"; shift ;;
    --*) key="$1"
         name="${key#--}"; name="${name//-/_}"
         if ! declare -p "$name" >/dev/null 2>&1 && declare -p extra_args >/dev/null 2>&1; then
           extra_args+=("$1"); shift
           while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do extra_args+=("$1"); shift; done
           continue
         fi
         [ $# -ge 2 ] || { echo "$0: $key needs a value" >&2; exit 2; }
         value="$2"; shift 2 ;;
    *) echo "$0: unexpected argument '$1' (options are --name value)" >&2; exit 2 ;;
  esac
  name="${key#--}"; name="${name//-/_}"
  if declare -p "$name" >/dev/null 2>&1; then
    printf -v "$name" '%s' "$value"
  elif declare -p extra_args >/dev/null 2>&1; then
    extra_args+=("$key=$value")
  else
    echo "$0: unknown option $key" >&2; exit 2
  fi
done
