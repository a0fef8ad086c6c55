/* matchlock guest agent: the `user` of an EXEC, from the image's /etc/passwd and /etc/group. */
#include "agent.h"  /* first: it defines _GNU_SOURCE */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int is_number(const char *s)
{
	if (!*s || strlen(s) > 10)
		return 0;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return 0;
	return 1;
}

/* Split a colon-separated line in place; returns the number of fields. */
static int split_fields(char *line, char **f, int max)
{
	int n = 0;
	line[strcspn(line, "\n")] = 0;
	while (n < max) {
		f[n++] = line;
		char *c = strchr(line, ':');
		if (!c)
			break;
		*c = 0;
		line = c + 1;
	}
	return n;
}

/*
 * Hand-parsed /etc/passwd (glibc's NSS does not work in a static binary).
 * Look up by name if name != NULL, else by uid. Returns 1 if found.
 */
static int pw_lookup(const char *name, uid_t uid, uid_t *o_uid, gid_t *o_gid, char *home, size_t homesz)
{
	FILE *f = fopen("/etc/passwd", "re");
	char *line = NULL, *fl[7];
	size_t cap = 0;
	int found = 0;
	if (!f)
		return 0;
	while (!found && getline(&line, &cap, f) > 0) {
		if (split_fields(line, fl, 7) < 7 || !is_number(fl[2]) || !is_number(fl[3]))
			continue;
		uid_t u = (uid_t)strtoul(fl[2], NULL, 10);
		if (name ? strcmp(fl[0], name) == 0 : u == uid) {
			found = 1;
			*o_uid = u;
			*o_gid = (gid_t)strtoul(fl[3], NULL, 10);
			snprintf(home, homesz, "%s", fl[5]);
		}
	}
	free(line);
	fclose(f);
	return found;
}

static int gr_lookup(const char *name, gid_t *o_gid)
{
	FILE *f = fopen("/etc/group", "re");
	char *line = NULL, *fl[4];
	size_t cap = 0;
	int found = 0;
	if (!f)
		return 0;
	while (!found && getline(&line, &cap, f) > 0) {
		if (split_fields(line, fl, 4) < 3 || !is_number(fl[2]))
			continue;
		if (strcmp(fl[0], name) == 0) {
			found = 1;
			*o_gid = (gid_t)strtoul(fl[2], NULL, 10);
		}
	}
	free(line);
	fclose(f);
	return found;
}

/* The `user` rules of docs/agent-protocol.md. Returns 0, or -1 with err filled. */
int resolve_user(const char *spec, uid_t *uid, gid_t *gid, char *home, size_t homesz, char *err,
			size_t errsz)
{
	char buf[512], *gpart;
	uid_t pu;
	gid_t pg;
	snprintf(buf, sizeof buf, "%s", spec);
	gpart = strchr(buf, ':');
	if (gpart)
		*gpart++ = 0;
	snprintf(home, homesz, "/");
	if (!*buf && !gpart) {
		/* empty = root; an unprivileged --stdio agent can only run as itself */
		*uid = geteuid() == 0 ? 0 : getuid();
		*gid = geteuid() == 0 ? 0 : getgid();
		if (pw_lookup(NULL, *uid, &pu, &pg, home, homesz) && !*home)
			snprintf(home, homesz, "/");
		return 0;
	}
	if (is_number(buf)) {
		*uid = (uid_t)strtoul(buf, NULL, 10);
		*gid = 0;
		if (pw_lookup(NULL, *uid, &pu, &pg, home, homesz))
			*gid = pg;
	} else if (!*buf || !pw_lookup(buf, 0, uid, gid, home, homesz)) {
		snprintf(err, errsz, "user \"%s\": no such user", spec);
		return -1;
	}
	if (!*home)
		snprintf(home, homesz, "/");
	if (gpart) {
		if (is_number(gpart)) {
			*gid = (gid_t)strtoul(gpart, NULL, 10);
		} else if (!*gpart || !gr_lookup(gpart, gid)) {
			snprintf(err, errsz, "user \"%s\": no such group", spec);
			return -1;
		}
	}
	return 0;
}
