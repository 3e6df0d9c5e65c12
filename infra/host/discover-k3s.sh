#!/usr/bin/env bash
# Read-only: what the k3s host runs, for `make discover` (tools/discover_hosts.py sends this script over
# SSH on stdin). k3s: its version, the unit's (and its drop-ins') ExecStart and environment, the env files,
# config.yaml,
# secrets encryption, the manifests k3s re-applies. PostgreSQL: version, roles with the kind of their
# password hash, databases and owners, pg_hba rules, settings waiting for a restart.
#
#   ssh ubuntu@k3s.katforge.com sudo -n bash -s < discover-k3s.sh
#
# K3S_BIN          the k3s program; default k3s
# K3S_UNIT_FILE    read this unit file (and its .d/*.conf drop-ins) instead of `systemctl cat k3s.service`
# K3S_ENV_FILE     read this env file instead of the unit's EnvironmentFiles
# K3S_CONFIG_FILE  default /etc/rancher/k3s/config.yaml
# K3S_DATA_DIR     k3s's --data-dir; default /var/lib/rancher/k3s (manifests in server/manifests)
# PG_BIN_DIR       PostgreSQL's programs; default /usr/lib/postgresql/16/bin
# PGHOST, PGPORT   libpq's usual settings, to reach the server's local socket
#
# Runs as root (root-only files, and psql as the postgres OS user). Changes nothing. Prints one fact a
# line, "<kind><TAB><field>...". Never a secret: the value of every setting whose name says it holds
# one (token, secret, password, key, credentials, a datastore endpoint, a proxy) is printed as
# [redacted], and of PostgreSQL's password hashes only their kind (md5, scram-sha-256, none).
set -uo pipefail

REDACTED='[redacted]'
# Names of settings whose value is a secret: k3s flags and config keys (--token, --agent-token,
# --datastore-endpoint with its password, --etcd-s3-secret-key...) and environment variables
# (K3S_DATASTORE_ENDPOINT...).
secret_name='(token|secret|passw|key|credential|datastore[-_]endpoint|proxy)'

emit() { local IFS=$'\t'; printf '%s\n' "$*"; }
is_secret() { [[ ${1,,} =~ $secret_name ]]; }

k3s_bin=${K3S_BIN:-k3s}
config_file=${K3S_CONFIG_FILE:-/etc/rancher/k3s/config.yaml}
data_dir=${K3S_DATA_DIR:-/var/lib/rancher/k3s}
pg_bin=${PG_BIN_DIR:-/usr/lib/postgresql/16/bin}

# Read whole before anything runs, and with stdin closed: the script itself arrives on stdin (bash -s),
# and nothing it runs may read the rest of it.
main() {
  # --- k3s -----------------------------------------------------------------------------------------

  if version=$("$k3s_bin" --version 2>/dev/null); then
    # "k3s version v1.34.6+k3s1 (hash)" first
    emit k3s-version "$(awk 'NR == 1 { print $3 }' <<<"$version")"
  else
    emit k3s-version -
  fi

  # The unit as systemd reads it: the unit file, then its drop-ins, each after a "# <path>" line
  # (`systemctl cat`). Per file, the settings of [Service] that give k3s its flags and environment.
  env_files=()
  if [[ -n ${K3S_UNIT_FILE:-} ]]; then
    unit_source=$K3S_UNIT_FILE
    unit=$(for file in "$K3S_UNIT_FILE" "$K3S_UNIT_FILE.d"/*.conf; do
             [[ -r $file ]] && printf '# %s\n%s\n\n' "$file" "$(<"$file")"
           done)
  else
    unit_source="systemctl cat k3s.service"
    unit=$(systemctl cat --no-pager k3s.service 2>/dev/null)
  fi
  if [[ -z $unit ]]; then
    emit unit-absent "$unit_source"
  else
    emit unit-source "$unit_source"
    file="" section=""
    # systemd joins lines ending in a backslash (the installer ends ExecStart with one before an empty line).
    while IFS= read -r line; do
      if [[ $line =~ ^#\ (/.*\.(service|conf))$ ]]; then
        file=${BASH_REMATCH[1]} section=""
        emit unit-file "$file"
        continue
      fi
      line=${line#"${line%%[![:space:]]*}"}
      [[ $line == \[* ]] && section=$line
      [[ $section == "[Service]" && $line =~ ^(ExecStart|Environment|EnvironmentFile)[[:space:]]*=[[:space:]]*(.*)$ ]] ||
        continue
      key=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
      value=${value%"${value##*[![:space:]\\]}"}
      case $key in
        ExecStart)
          # Split as systemd does for the installer's quoted words ('--flag' 'value'); an empty value
          # empties the list, so a drop-in can replace the command line.
          words=() redact_next=false
          while IFS= read -r -d '' word; do
            if $redact_next; then
              word=$REDACTED
              redact_next=false
            elif [[ $word == -* ]]; then
              flag=${word%%=*}
              if [[ $flag == -t ]] || is_secret "$flag"; then
                if [[ $word == *=* ]]; then word="$flag=$REDACTED"; else redact_next=true; fi
              fi
            fi
            words+=("$word")
          done < <([[ -z $value ]] || xargs printf '%s\0' <<<"$value" 2>/dev/null)
          emit unit-exec-start "$file" "${words[@]}" ;;
        Environment)
          [[ -n $value ]] || emit unit-env-reset "$file"
          while IFS= read -r -d '' assignment; do
            name=${assignment%%=*}
            if is_secret "$name"; then assignment="$name=$REDACTED"; fi
            emit unit-env "$file" "$name" "${assignment#*=}"
          done < <([[ -z $value ]] || xargs printf '%s\0' <<<"$value" 2>/dev/null) ;;
        EnvironmentFile)
          if [[ -z $value ]]; then
            emit unit-env-file-reset "$file"
          else
            value=${value#-}
            value=${value//%N/k3s}
            env_files+=("$value")
            emit unit-env-file "$file" "$value"
          fi ;;
      esac
    done < <(sed -e ':a' -e '/\\$/N; s/\\\n/ /; ta' <<<"$unit")
  fi

  # The unit's environment files that exist (systemd skips a missing one marked with "-").
  if [[ -n ${K3S_ENV_FILE:-} ]]; then env_files=("$K3S_ENV_FILE"); fi
  for env_file in "${env_files[@]}"; do
    [[ -r $env_file ]] || continue
    emit env-file "$env_file"
    assignments=$(<"$env_file")
    while IFS= read -r line; do
      [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
      name=${BASH_REMATCH[2]} value=${BASH_REMATCH[3]}
      value=${value#[\"\']}
      value=${value%[\"\']}
      if is_secret "$name"; then emit env "$env_file" "$name" "$REDACTED"; else emit env "$env_file" "$name" "$value"; fi
    done <<<"$assignments"
  done

  if [[ -r $config_file ]]; then
    emit config-file "$config_file"
    # A top-level key that names a secret loses its value, and so do the lines that continue it.
    # Comments are left out (one may hold an old value), except k3s-install.sh's own, which hold none and
    # tell its settings from those it carried: the header of a file it wrote, and its two-line mark.
    awk -v pattern="$secret_name" -v redacted="\"$REDACTED\"" '
      BEGIN { mark = -1 }
      NR == 1 && /^# Managed by katforge/ { print; next }
      /^# Carried from the live k3s unit/ { print; mark = NR; next }
      NR == mark + 1 && /^# runs\): / { print; next }
      /^[[:space:]]*(#|$)/ { next }
      /^[^[:space:]#-][^:]*:/ {
        key = $0; sub(/:.*/, "", key); gsub(/["'\'']/, "", key)
        hiding = (tolower(key) ~ pattern)
        if (hiding) { print key ": " redacted; next }
      }
      /^[[:space:]]/ || /^-/ { if (hiding) next }
      { print }' "$config_file" | while IFS= read -r line; do emit config-line "$line"; done
  else
    emit config-file-absent "$config_file"
  fi

  if status=$("$k3s_bin" secrets-encrypt status 2>&1); then
    while IFS= read -r line; do [[ -n $line ]] && emit secrets-encrypt "$line"; done <<<"$status"
  else
    emit secrets-encrypt-error "$(head -n 1 <<<"$status")"
  fi

  manifests=$data_dir/server/manifests
  emit manifests-dir "$manifests"
  if [[ -d $manifests ]]; then
    find "$manifests" -mindepth 1 \( -type f -o -type l \) -printf '%P\n' | LC_ALL=C sort | while IFS= read -r file; do
      emit manifest "$file"
    done
  fi

  # --- PostgreSQL ----------------------------------------------------------------------------------

  # One psql session as the postgres OS user over the local socket: the superuser, by peer authentication.
  queries="
  SELECT 'pg-version', current_setting('server_version'), current_setting('server_version_num');
  SELECT 'pg-setting', name, current_setting(name) FROM pg_settings
   WHERE name IN ('config_file', 'hba_file', 'data_directory', 'listen_addresses', 'port',
                  'password_encryption', 'ssl', 'max_connections', 'shared_buffers')
   ORDER BY name;
  -- The kind of each password hash, never the hash.
  SELECT 'pg-role', rolname, rolsuper, rolcanlogin, rolcreatedb, rolcreaterole,
         CASE WHEN rolpassword IS NULL THEN 'none'
              WHEN rolpassword LIKE 'SCRAM-SHA-256\$%' THEN 'scram-sha-256'
              WHEN rolpassword ~ '^md5[0-9a-f]{32}\$' THEN 'md5'
              ELSE 'plaintext' END,
         COALESCE(rolvaliduntil::text, ''), quote_ident(rolname)
   FROM pg_authid WHERE rolname !~ '^pg_' ORDER BY rolname;
  SELECT 'pg-database', datname, pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datallowconn
   FROM pg_database WHERE NOT datistemplate ORDER BY datname;
  -- pg_hba options may carry a secret (ldapbindpasswd, radiussecrets).
  SELECT 'pg-hba', line_number, type, array_to_string(database, ','), array_to_string(user_name, ','),
         COALESCE(address, ''), COALESCE(netmask, ''), COALESCE(auth_method, ''),
         COALESCE(array_to_string(ARRAY(SELECT regexp_replace(o, '^(ldapbindpasswd|radiussecrets)=.*', '\\1=$REDACTED')
                                        FROM unnest(options) o), ','), ''),
         COALESCE(error, ''), COALESCE(file_name, ''), COALESCE(rule_number::text, '')
   FROM pg_hba_file_rules ORDER BY file_name, line_number;
  -- The text of pg_hba's rules, their secrets redacted; all of a file pg-configure.sh wrote (no comment of
  -- the operators' there), to tell whether its next run would change it.
  SELECT 'pg-hba-line', f.name, l.n,
         regexp_replace(l.line, '((ldapbindpasswd|radiussecrets?)[[:space:]]*=[[:space:]]*)(\"[^\"]*\"|[^[:space:]]+)',
                        '\\1$REDACTED', 'gi')
   FROM (SELECT file_name FROM pg_hba_file_rules UNION SELECT current_setting('hba_file')) AS f (name),
        LATERAL (SELECT coalesce(pg_read_file(f.name, true), '')) AS r (text),
        LATERAL unnest(string_to_array(r.text, E'\n')) WITH ORDINALITY AS l (line, n)
   WHERE r.text LIKE '# Managed by katforge%'
      OR l.n IN (SELECT line_number FROM pg_hba_file_rules h WHERE h.file_name = f.name)
   ORDER BY f.name, l.n;
  -- Where each setting is set, in the order the server reads the files (no value: one may be a secret),
  -- and postgresql.conf's include directives: what a file pg-configure.sh writes would come after.
  SELECT 'pg-file-setting', seqno, name, COALESCE(sourcefile, ''), COALESCE(sourceline::text, ''), applied
   FROM pg_file_settings ORDER BY seqno;
  SELECT 'pg-conf-include', l.n, btrim(l.line)
   FROM unnest(string_to_array(coalesce(pg_read_file(current_setting('config_file'), true), ''), E'\n'))
        WITH ORDINALITY AS l (line, n)
   WHERE l.line ~* '^[[:space:]]*include(_dir|_if_exists)?[[:space:]=]';
  -- A setting changed in the files that only a restart applies: running value, then the files'.
  SELECT 'pg-pending-restart', s.name, current_setting(s.name),
         COALESCE((SELECT f.setting FROM pg_file_settings f WHERE f.name = s.name ORDER BY f.seqno DESC LIMIT 1), '')
   FROM pg_settings s WHERE s.pending_restart ORDER BY s.name;
  "
  # Schemas, relations and functions postgres owns outside public and the system schemas (not an
  # extension's, not a sequence that belongs to a column), at most 200.
  foreign_owned="
  SELECT 'pg-foreign-owned', current_database(), kind, name FROM (
    SELECT 'schema', quote_ident(n.nspname), n.oid, 'pg_namespace'::regclass, n.nspname
      FROM pg_namespace n WHERE n.nspowner = 'postgres'::regrole
    UNION ALL
    SELECT CASE c.relkind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence'
                          WHEN 'f' THEN 'foreign table' ELSE 'table' END,
           c.oid::regclass::text, c.oid, 'pg_class'::regclass, n.nspname
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relowner = 'postgres'::regrole AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
       AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                         AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i'))
    UNION ALL
    SELECT 'function', p.oid::regprocedure::text, p.oid, 'pg_proc'::regclass, n.nspname
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proowner = 'postgres'::regrole
  ) AS o (kind, name, object, catalog, schema)
  WHERE o.schema NOT IN ('public', 'information_schema') AND o.schema !~ '^pg_'
    AND NOT EXISTS (SELECT FROM pg_depend e WHERE e.classid = o.catalog AND e.objid = o.object AND e.deptype = 'e')
  ORDER BY kind, name LIMIT 200;
  "
  if [[ ! -x $pg_bin/psql ]]; then
    emit postgres-absent "$pg_bin/psql"
  elif ! facts=$(runuser -u postgres -- "$pg_bin/psql" -X -A -t -q -F $'\t' -v ON_ERROR_STOP=1 -d postgres \
                   -c "$queries" 2>&1); then
    emit postgres-error "$(head -n 1 <<<"$facts")"
  else
    printf '%s\n' "$facts"
    # In each database but postgres: what postgres owns outside schema public. pg-database.sh gives the
    # stage's role what postgres owns in public only; the rest the apps could not use as that role.
    awk -F '\t' '$1 == "pg-database" && $5 == "t" && $2 != "postgres" { print $2 }' <<<"$facts" |
      while IFS= read -r database; do
        # The name through PGDATABASE: libpq reads a -d value with "=" or a URI prefix as a connection string.
        if ! owned=$(PGDATABASE=$database runuser -u postgres -- "$pg_bin/psql" -X -A -t -q -F $'\t' \
                       -v ON_ERROR_STOP=1 -c "$foreign_owned" 2>&1); then
          emit pg-foreign-owned-error "$database" "$(head -n 1 <<<"$owned")"
        elif [[ -n $owned ]]; then
          printf '%s\n' "$owned"
        fi
      done
  fi
}

main </dev/null
exit 0
