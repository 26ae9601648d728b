#!/usr/bin/env bash
# Download Llama 2, Llama 3 or Llama 3.1 weights with the signed URL that Meta
# emails you after you accept the license at https://llama.meta.com/llama-downloads/
#
#   ./download.sh                 asks for the URL, the Llama version and the models
#   ./download.sh --list          prints the models this script knows
#
# Unattended: every question can be answered from the environment instead:
#   PRESIGNED_URL='https://…/*?Policy=…&Signature=…'   the URL from the email
#   LLAMA_VERSION=2 | 3 | 3.1                            the family the URL is for
#   MODEL_SIZE=7B,13B-chat                               models (see --list); empty = the default set
#   TARGET_FOLDER=.                                      where the files go (default: current folder)
#   DOWNLOAD_CHUNK_BYTES=27000000000                     bytes per request for the 405B shards
#
# Files download to NAME.part and get their final name only once complete, so
# an interrupted run resumes where it stopped when run again. Every model
# folder is then checked against its checklist.chk (md5); a file that fails is
# renamed to NAME.bad. The script exits non-zero on any failure.

# Written for the bash 3.2 that macOS ships: no associative arrays, no ${x,,}.
set -euo pipefail

REQUEST_URL="https://llama.meta.com/llama-downloads/"

# One line per model: Llama version, name, folder on the server, local folder,
# number of consolidated.NN.pth shards (= model-parallel size), flags.
# Flags: fp8  = also fp8_scales_N.pt, one per shard (405B FP8 checkpoints);
#        huge = shards are too large (51-101 GB) for one HTTP response from
#               Meta's CDN, so they are fetched in ranges (as Meta's own script did).
# Sources: meta-llama/llama and meta-llama/llama3 download.sh, and
# meta-llama/llama-models (models/llama3_1/download.sh, models/sku_list.py).
MODELS='
2    7B                  llama-2-7b                         llama-2-7b                         1   -
2    7B-chat             llama-2-7b-chat                    llama-2-7b-chat                    1   -
2    13B                 llama-2-13b                        llama-2-13b                        2   -
2    13B-chat            llama-2-13b-chat                   llama-2-13b-chat                   2   -
2    70B                 llama-2-70b                        llama-2-70b                        8   -
2    70B-chat            llama-2-70b-chat                   llama-2-70b-chat                   8   -
3    8B                  8b_pre_trained                     Meta-Llama-3-8B                    1   -
3    8B-Instruct         8b_instruction_tuned               Meta-Llama-3-8B-Instruct           1   -
3    70B                 70b_pre_trained                    Meta-Llama-3-70B                   8   -
3    70B-Instruct        70b_instruction_tuned              Meta-Llama-3-70B-Instruct          8   -
3.1  8B                  Meta-Llama-3.1-8B                  Meta-Llama-3.1-8B                  1   -
3.1  8B-Instruct         Meta-Llama-3.1-8B-Instruct         Meta-Llama-3.1-8B-Instruct         1   -
3.1  70B                 Meta-Llama-3.1-70B                 Meta-Llama-3.1-70B                 8   -
3.1  70B-Instruct        Meta-Llama-3.1-70B-Instruct        Meta-Llama-3.1-70B-Instruct        8   -
3.1  405B-MP16           Meta-Llama-3.1-405B-MP16           Meta-Llama-3.1-405B-MP16           16  huge
3.1  405B-MP8            Meta-Llama-3.1-405B-MP8            Meta-Llama-3.1-405B-MP8            8   huge
3.1  405B-FP8            Meta-Llama-3.1-405B                Meta-Llama-3.1-405B                8   huge,fp8
3.1  405B-Instruct-MP16  Meta-Llama-3.1-405B-Instruct-MP16  Meta-Llama-3.1-405B-Instruct-MP16  16  huge
3.1  405B-Instruct-MP8   Meta-Llama-3.1-405B-Instruct-MP8   Meta-Llama-3.1-405B-Instruct-MP8   8   huge
3.1  405B-Instruct-FP8   Meta-Llama-3.1-405B-Instruct       Meta-Llama-3.1-405B-Instruct       8   huge,fp8
'

# ---------------------------------------------------------------- messages

say() { printf '%s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

expired_hint() {
    say "the link expired or was used too often; request a new one at $REQUEST_URL"
}

# ---------------------------------------------------------------- the layouts

lowercase() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

# The lines of $MODELS for Llama version $1.
models_of() {
    local version=$1 v rest
    while read -r v rest; do
        if [[ -n $v && $v == "$version" ]]; then say "$v $rest"; fi
    done <<< "$MODELS"
}

# The line of model $2 (any letter case) of Llama version $1; fails if unknown.
model_line() {
    local wanted v name rest
    wanted=$(lowercase "$2")
    while read -r v name rest; do
        if [[ $(lowercase "$name") == "$wanted" ]]; then say "$v $name $rest"; return 0; fi
    done < <(models_of "$1")
    return 1
}

# The comma-separated names of the models of version $1 that an empty answer selects.
default_models() {
    case $1 in
        2) say "7B,13B,70B,7B-chat,13B-chat,70B-chat" ;;
        3) say "8B,8B-Instruct,70B,70B-Instruct" ;;
        # Each 405B variant is 0.5-0.8 TB: download those only when asked for by name.
        3.1) say "8B,8B-Instruct,70B,70B-Instruct" ;;
    esac
}

# Files at the top of the download, before the model folders.
top_level_files() {
    case $1 in
        2) say "LICENSE USE_POLICY.md tokenizer.model tokenizer_checklist.chk" ;;
        3) say "LICENSE USE_POLICY" ;;
        3.1) say "LICENSE USE_POLICY.md" ;;
    esac
}

shard_name() { printf 'consolidated.%02d.pth' "$1"; }

# The known models of Llama version $1, or of all versions.
list_models() {
    local version v name remote folder shards flags
    for version in ${1:-2 3 3.1}; do
        say "Llama $version (default: $(default_models "$version"))"
        while read -r v name remote folder shards flags; do
            printf '  %-18s -> %-34s %2d x consolidated.NN.pth' "$name" "$folder/" "$shards"
            if [[ $flags == *fp8* ]]; then printf ' + %d x fp8_scales_N.pt' "$shards"; fi
            if [[ $flags == *huge* ]]; then printf ' (fetched in ranges)'; fi
            printf '\n'
        done < <(models_of "$version")
    done
}

# ---------------------------------------------------------------- tools

have() { command -v "$1" > /dev/null 2>&1; }

# md5 of file $1 as 32 lowercase hex digits: md5sum on Linux, md5 on macOS/BSD.
md5_of() {
    local sum
    if have md5sum; then
        sum=$(md5sum < "$1")
    elif have md5; then
        sum=$(md5 -q "$1")
    else
        return 1
    fi
    sum=${sum%% *}
    lowercase "$sum"
}

file_size() { local n; n=$(wc -c < "$1"); say $((n)); }

# The most bytes a file named $1 can hold; a server that sends more is not
# sending that file (an endless body would otherwise fill the disk). The
# largest real files are the 405B-MP8 shards, about 101 GB.
max_bytes() {
    case $1 in
        consolidated.*.pth) say $((128 * 1024 * 1024 * 1024)) ;;
        fp8_scales_*.pt) say $((1024 * 1024 * 1024)) ;;
        tokenizer.model) say $((16 * 1024 * 1024)) ;;
        *) say $((1024 * 1024)) ;;  # params.json, checklists, LICENSE, USE_POLICY
    esac
}

# The cap, in the 1024-byte blocks of bash's `ulimit -f`, for the downloader
# and whatever appends to the file; set per file by fetch().
FILE_LIMIT_BLOCKS=unlimited

# In a subshell: no process started from it can write a file past the cap
# (the kernel stops it with SIGXFSZ / EFBIG), whatever the server sends.
limit_file_size() {
    local current
    current=$(ulimit -f)
    if [[ $FILE_LIMIT_BLOCKS != unlimited ]] && [[ $current == unlimited || $current -gt $FILE_LIMIT_BLOCKS ]]; then
        ulimit -f "$FILE_LIMIT_BLOCKS"
    fi
}

# True if file $1 reached the cap (so the download was cut there).
too_big() {
    [[ $FILE_LIMIT_BLOCKS != unlimited && -f $1 ]] && (($(file_size "$1") >= FILE_LIMIT_BLOCKS * 1024))
}


# ---------------------------------------------------------------- downloading

# The signed URL for path $1 on the server: the '*' of the URL replaced by it.
signed_url() {
    say "${PRESIGNED_URL%%\**}$1${PRESIGNED_URL#*\*}"
}

# After a failed download, the HTTP status of the last response ('' if none).
HTTP_STATUS=""

# Download URL $1 into $2, resuming whatever $2 already holds.
http_get() {
    if have wget; then wget_get "$@"; else curl_get "$@" 0; fi
}

wget_get() {
    local url=$1 out=$2 log rc=0
    log=$(mktemp)
    # wget prints "ERROR 403: Forbidden." on failure; LC_ALL=C keeps that in English.
    (
        limit_file_size
        LC_ALL=C exec wget --continue --no-verbose --show-progress --progress=bar:force:noscroll \
            --max-redirect=5 --connect-timeout=30 --read-timeout=300 -O "$out" "$url"
    ) 2>&1 | tee "$log" >&2 || rc=$?
    HTTP_STATUS=$(sed -n 's/.*ERROR \([0-9][0-9][0-9]\).*/\1/p' "$log" | tail -n 1)
    rm -f "$log"
    return "$rc"
}

# Download URL $1 into $2 with curl, resuming from the size of $2, and at most
# $3 bytes per request when $3 > 0. Retries interrupted transfers a few times.
curl_get() {
    local url=$1 out=$2 chunk=$3 piece="$2.piece" have_bytes range code rc failures=0
    while :; do
        have_bytes=0
        if [[ -f $out ]]; then have_bytes=$(file_size "$out"); fi
        range="$have_bytes-"
        if ((chunk > 0)); then range="$have_bytes-$((have_bytes + chunk - 1))"; fi
        rc=0
        # No --fail: the status code decides, and curl stays quiet about the 416
        # that ends a file whose size is a multiple of the chunk.
        code=$(
            limit_file_size
            curl --location --max-redirs 5 --proto-redir =http,https --connect-timeout 30 \
                --speed-limit 1 --speed-time 300 --progress-bar --range "$range" \
                -o "$piece" -w '%{http_code}' "$url"
        ) || rc=$?
        if too_big "$piece"; then
            # The response alone reached the cap: keep it as the part so fetch() reports it.
            mv -f "$piece" "$out"; HTTP_STATUS=""; return 1
        fi
        case $code in
            206)
                # A range of the file (maybe cut short): append it; the next request goes on from there.
                # Appending past the file's cap fails: stop (fetch says why).
                (limit_file_size; cat "$piece" >> "$out") || { rm -f "$piece"; HTTP_STATUS=""; return 1; }
                if ((rc == 0 && chunk > 0)) && (($(file_size "$piece") == chunk)); then
                    rm -f "$piece"; failures=0; continue
                fi
                rm -f "$piece"
                if ((rc == 0)); then return 0; fi
                ;;
            200)
                # The server ignored the range and sent the whole file from the start.
                mv -f "$piece" "$out"
                if ((rc == 0)); then return 0; fi
                ;;
            416)
                # Nothing exists past the bytes we have: the file is complete.
                rm -f "$piece"
                return 0
                ;;
            *)
                rm -f "$piece"
                if [[ $code != 000 ]]; then HTTP_STATUS=$code; return 1; fi
                ;;
        esac
        failures=$((failures + 1))
        if ((failures >= 5)); then HTTP_STATUS=""; return 1; fi
        say "transfer interrupted (curl exit $rc), resuming ..."
        sleep 1
    done
}

# Refuse a downloaded file $1 that is really an error page, renaming it to $2.bad.
reject_error_page() {
    local file=$1 dest=$2 start
    # The first KB, NUL bytes dropped (bash variables cannot hold them).
    start=$(head -c 1024 "$file" | tr -d '\000' | tr '[:upper:]' '[:lower:]')
    if [[ $start == *"<html"* || $start == *"<!doctype html"* ]]; then
        mv -f "$file" "$dest.bad"
        die "$dest: you saved a web page, not the file: copy the URL from the email itself, not via 'Copy link'. (The page is kept as $dest.bad.)"
    fi
    if [[ $start == *"<error>"*"<code>"* ]]; then
        mv -f "$file" "$dest.bad"
        die "$dest: the server sent an error message instead of the file (kept as $dest.bad): $(expired_hint)"
    fi
}

# Download server path $1 to local file $2 (fetched in ranges if $3 = huge).
# A file only gets its final name once it is complete, so an existing $2 is skipped.
fetch() {
    local path=$1 dest=$2 how=${3:-} part="$2.part" ok=1 max
    if [[ -L $dest || -L $part ]]; then
        die "$dest (or its .part) is a symbolic link; this script writes only plain files in the target folder. Remove the link and run it again."
    fi
    if [[ -s $dest ]]; then
        say "have $dest"
        return 0
    fi
    say "downloading $dest"
    max=$(max_bytes "${dest##*/}")
    FILE_LIMIT_BLOCKS=$(((max + 1023) / 1024))
    if [[ $how == huge ]]; then
        have curl || die "$dest: downloading the 405B shards needs curl; please install it"
        curl_get "$(signed_url "$path")" "$part" "${DOWNLOAD_CHUNK_BYTES:-27000000000}" || ok=0
    else
        http_get "$(signed_url "$path")" "$part" || ok=0
    fi
    if too_big "$part"; then
        FILE_LIMIT_BLOCKS=unlimited
        rm -f "$part"
        die "$dest: the server sent $max bytes or more, more than any real ${dest##*/} holds; stopped and removed the partial file. Check that PRESIGNED_URL is the link from Meta's email."
    fi
    FILE_LIMIT_BLOCKS=unlimited
    if ((ok == 0)); then
        if [[ -f $part && ! -s $part ]]; then rm -f "$part"; fi
        case $HTTP_STATUS in
            403) die "$dest: HTTP 403 Forbidden: $(expired_hint). Then run this script again: it resumes where it stopped." ;;
            404) die "$dest: HTTP 404 Not Found: is your link for Llama $LLAMA_VERSION? Check LLAMA_VERSION and the model names (./download.sh --list)." ;;
            "") die "$dest: the download failed (no HTTP error; network?). Run this script again to resume it." ;;
            *) die "$dest: the download failed with HTTP $HTTP_STATUS. Run this script again to resume it." ;;
        esac
    fi
    [[ -s $part ]] || { rm -f "$part"; die "$dest: the server sent an empty file. Run this script again; if it persists, $(expired_hint)"; }
    reject_error_page "$part" "$dest"
    mv -f "$part" "$dest"
}

# ---------------------------------------------------------------- verifying

# Check the files in folder $1 against the md5 list $1/$2 ("md5  name" lines, as
# md5sum writes them). Every file named in $3 (space-separated) must be listed;
# only the files named in $3 or $4 are ever read or renamed: the list comes from
# the server, and a name like ../../x or /etc/x must not reach outside $1.
# A file whose md5 differs is renamed to NAME.bad. Fails if anything is wrong.
verify() {
    local dir=$1 list=$2 required=$3 optional=${4:-} sum name shown actual listed=" " bad=0 ignored=0
    say "checking md5 sums in $dir/$list"
    while read -r sum name || [[ -n $sum ]]; do
        name=${name%$'\r'}
        name=${name#\*}  # md5sum's marker for binary mode
        [[ -n $sum ]] || continue
        # Pure bash until the name is known to be ours: a hostile list may have 100,000 lines.
        if [[ -z $name || " $required $optional " != *" $name "* ]]; then
            ignored=$((ignored + 1))
            if ((ignored <= 5)); then
                printf -v shown '%q' "$name"
                say "  IGNORED $shown: not a file of this download; not read or touched"
            fi
            continue
        fi
        sum=$(lowercase "$sum")
        if [[ $listed == *" $name "* ]]; then
            say "  TWICE   $name: listed twice in $list; only the first line counts"
            bad=1
            continue
        fi
        listed="$listed$name "
        if [[ ! $sum =~ ^[0-9a-f]{32}$ ]]; then
            printf -v shown '%q' "$sum"
            say "  BAD LINE for $name in $list: $shown is not an md5 sum"
            bad=1
            continue
        fi
        if [[ -L $dir/$name ]]; then
            say "  SYMLINK $name: a symbolic link, not a downloaded file; not read (remove it)"
            bad=1
            continue
        fi
        if [[ ! -f $dir/$name ]]; then
            say "  MISSING $name: listed in $list but not downloaded"
            bad=1
            continue
        fi
        actual=$(md5_of "$dir/$name") || die "could not compute the md5 of $dir/$name"
        if [[ $actual == "$sum" ]]; then
            say "  OK      $name"
        else
            mv -f "$dir/$name" "$dir/$name.bad"
            say "  FAILED  $name: md5 is $actual, expected $sum; renamed to $dir/$name.bad"
            bad=1
        fi
    done < "$dir/$list"
    if ((ignored > 5)); then say "  IGNORED $((ignored - 5)) more lines naming files that are not part of this download"; fi
    for name in $required; do
        if [[ $listed != *" $name "* ]]; then
            say "  NOT LISTED $name: $dir/$list has no md5 for it, so it cannot be verified"
            bad=1
        fi
    done
    if ((bad)); then
        die "$dir did not pass its md5 check (see above). Run this script again to download the missing or renamed files."
    fi
}

# ---------------------------------------------------------------- the plan

# Download and verify one model, given its line from $MODELS.
download_model() {
    local version=$1 name=$2 remote=$3 folder=$4 shards=$5 flags=$6
    local dir="$TARGET_FOLDER/$folder" i how="" weights="" others="params.json"
    say ""
    say "=== Llama $version $name -> $dir"
    mkdir -p "$dir"
    fetch "$remote/checklist.chk" "$dir/checklist.chk"
    fetch "$remote/params.json" "$dir/params.json"
    # Llama 2 has a single tokenizer at the top; Llama 3 and 3.1 have one per model.
    if [[ $version != 2 ]]; then
        fetch "$remote/tokenizer.model" "$dir/tokenizer.model"
        others="$others tokenizer.model"
    fi
    if [[ $flags == *fp8* ]]; then
        for ((i = 0; i < shards; i++)); do
            fetch "$remote/fp8_scales_$i.pt" "$dir/fp8_scales_$i.pt"
            others="$others fp8_scales_$i.pt"
        done
    fi
    if [[ $flags == *huge* ]]; then how=huge; fi
    for ((i = 0; i < shards; i++)); do
        fetch "$remote/$(shard_name "$i")" "$dir/$(shard_name "$i")" "$how"
        weights="$weights $(shard_name "$i")"
    done
    verify "$dir" checklist.chk "$weights" "$others"
}

# Print $1's value if it is set in the environment, else ask for it with prompt $2.
answer() {
    local var=$1 prompt=$2 reply=""
    if [[ -n ${!var+set} ]]; then
        say "${!var}"
        return 0
    fi
    read -r -p "$prompt" reply || [[ -n $reply ]] || return 1
    say "$reply"
}

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

main() {
    case ${1:-} in
        --list) list_models; return 0 ;;
        -h | --help) usage; return 0 ;;
        "") ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    have wget || have curl || die "this script needs wget or curl; please install one"
    have md5sum || have md5 || die "this script needs md5sum (Linux) or md5 (macOS) to verify the files"

    PRESIGNED_URL=$(answer PRESIGNED_URL "Enter the URL from email: ") ||
        die "no URL: set PRESIGNED_URL or run this script in a terminal"
    # Pasted URLs often carry spaces or quotes around them.
    PRESIGNED_URL=$(printf '%s' "$PRESIGNED_URL" | tr -d " \t\r\"'")
    [[ $PRESIGNED_URL == http*://*'*'* ]] ||
        die "that is not the download URL: it must start with https:// and contain a '*'. Copy the whole URL from the email."

    LLAMA_VERSION=$(answer LLAMA_VERSION "Which Llama is the URL for? (2, 3 or 3.1): ") ||
        die "no Llama version: set LLAMA_VERSION to 2, 3 or 3.1"
    LLAMA_VERSION=$(printf '%s' "$LLAMA_VERSION" | tr -d ' ')
    case $LLAMA_VERSION in
        2 | 3 | 3.1) ;;
        *) die "unknown Llama version '$LLAMA_VERSION': use 2, 3 or 3.1" ;;
    esac

    local defaults wanted m line
    defaults=$(default_models "$LLAMA_VERSION")
    if [[ -z ${MODEL_SIZE+set} ]]; then list_models "$LLAMA_VERSION"; fi
    wanted=$(answer MODEL_SIZE "Enter the models to download, separated by commas, or press Enter for $defaults: ") || wanted=""
    wanted=$(printf '%s' "${wanted:-$defaults}" | tr -d ' ')

    # Check every name before downloading anything.
    local lines=""
    for m in ${wanted//,/ }; do
        line=$(model_line "$LLAMA_VERSION" "$m") ||
            die "unknown model '$m' for Llama $LLAMA_VERSION; known: $(models_of "$LLAMA_VERSION" | cut -d' ' -f2 | tr '\n' ' ')"
        lines="$lines$line"$'\n'
    done

    TARGET_FOLDER=${TARGET_FOLDER:-.}
    mkdir -p "$TARGET_FOLDER"
    say "Downloading into $TARGET_FOLDER"

    local f
    for f in $(top_level_files "$LLAMA_VERSION"); do
        fetch "$f" "$TARGET_FOLDER/$f"
    done
    if [[ $LLAMA_VERSION == 2 ]]; then
        verify "$TARGET_FOLDER" tokenizer_checklist.chk tokenizer.model
    fi

    while read -r line; do
        [[ -n $line ]] || continue
        # shellcheck disable=SC2086  # split the table line into its fields
        download_model $line
    done <<< "$lines"

    say ""
    say "Done: all files downloaded and their md5 sums verified."
}

main "$@"
