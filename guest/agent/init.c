/* matchlock guest agent: PID 1 (mounts, modules, network, clock) and finding the port. */
#include "agent.h"  /* first: it defines _GNU_SOURCE */

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static char cmd_hostname[256], cmd_time[64], cmd_rootfstype[64] = "ext4";
static int cmd_fuse; /* matchlock.fuse=1: load fuse now, host folders come later (a snapshot template) */
static char cmd_net[96]; /* matchlock.net=GUEST/PREFIX,GATEWAY,MTU: the host's choice for eth0 */
static int cmd_probe; /* matchlock.probe=1: the host's accelerator test; say so and power off */
static char cmd_vfs[512]; /* matchlock.vfs=PATH: mount the host's FUSE file system there (vfs.c) */
static int cmd_rng; /* matchlock.rng=1: the host gave a virtio-rng device (the CPU has no RDRAND) */
#define MAX_EXTRA_DISKS 20
static char cmd_disk[MAX_EXTRA_DISKS][320]; /* matchlock.disk=vdX:PATH:ro|rw, one per extra disk */
static int n_disks;

/* One word of matchlock.NAME=VALUE, from the kernel command line or a SET_IDENTITY frame. */
static void parse_param(const char *tok)
{
	if (!strncmp(tok, "matchlock.hostname=", 19))
		snprintf(cmd_hostname, sizeof cmd_hostname, "%s", tok + 19);
	else if (!strncmp(tok, "matchlock.time=", 15))
		snprintf(cmd_time, sizeof cmd_time, "%s", tok + 15);
	else if (!strncmp(tok, "matchlock.rootfstype=", 21))
		snprintf(cmd_rootfstype, sizeof cmd_rootfstype, "%s", tok + 21);
	else if (!strncmp(tok, "matchlock.net=", 14))
		snprintf(cmd_net, sizeof cmd_net, "%s", tok + 14);
	else if (!strcmp(tok, "matchlock.probe=1"))
		cmd_probe = 1;
	else if (!strcmp(tok, "matchlock.fuse=1"))
		cmd_fuse = 1;
	else if (!strcmp(tok, "matchlock.rng=1"))
		cmd_rng = 1;
	else if (!strncmp(tok, "matchlock.vfs=", 14))
		snprintf(cmd_vfs, sizeof cmd_vfs, "%s", tok + 14);
	else if (!strncmp(tok, "matchlock.disk=", 15) && n_disks < MAX_EXTRA_DISKS)
		snprintf(cmd_disk[n_disks++], sizeof cmd_disk[0], "%s", tok + 15);
}

/* Splits `buf` (modified) on blanks. */
static void parse_params(char *buf)
{
	char *save = NULL;
	for (char *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save))
		parse_param(tok);
}

static void parse_cmdline(void)
{
	char buf[4096];
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
	if (fd >= 0)
		close(fd);
	if (n <= 0)
		return;
	buf[n] = 0;
	parse_params(buf);
}

static void xmount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, flags, data) < 0)
		fatal("mount %s on %s (%s): %s", src, dst, type ? type : "move", strerror(errno));
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int ends_with(const char *s, const char *suffix)
{
	size_t l = strlen(s), n = strlen(suffix);
	return l >= n && !strcmp(s + l - n, suffix);
}

/* Drivers of devices the host adds only when needed: not loaded without them (each costs boot time). */
static int unneeded_module(const char *name)
{
	return (!*cmd_vfs && !cmd_fuse && ends_with(name, "-fuse.ko")) || /* FUSE only serves host folders */
	       (!cmd_rng && ends_with(name, "-virtio_rng.ko")); /* RDRAND seeds the CRNG */
}

/* The host names modules NN-name.ko in dependency order: load them in lexical order. */
static void load_modules(void)
{
	DIR *d = opendir("/lib/modules");
	char **names = NULL;
	size_t n = 0;
	struct dirent *de;
	if (!d)
		return;
	while ((de = readdir(d))) {
		size_t l = strlen(de->d_name);
		if (l > 3 && !strcmp(de->d_name + l - 3, ".ko"))
			vec_add((void ***)&names, &n, xstrdup(de->d_name));
	}
	closedir(d);
	if (n)
		qsort(names, n, sizeof *names, cmp_str);
	for (size_t i = 0; i < n; i++) {
		char path[512];
		snprintf(path, sizeof path, "/lib/modules/%s", names[i]);
		if (unneeded_module(names[i])) {
			unlink(path);
			free(names[i]);
			continue;
		}
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST))
			console("load %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		unlink(path);  /* the initramfs stays in RAM: free what is no longer needed */
		free(names[i]);
	}
	free(names);
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static void wait_for(const char *path, int ms)
{
	for (long long end = now_ms() + ms; access(path, F_OK) < 0; usleep(5000))
		if (now_ms() >= end)
			fatal("%s did not appear within %d ms", path, ms);
}

static int set_addr(int s, unsigned long req, const char *ifname, in_addr_t a)
{
	struct ifreq ifr = { 0 };
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = a;
	return ioctl(s, req, &ifr);
}

/*
 * eth0 as the host chose it (the kernel has no ip= autoconfig): IPv6 off, MTU, address, link up,
 * default route. Failures are logged, not fatal: the VM stays usable without its network.
 */
static void configure_eth0(void)
{
	char ip[32] = "", gw[32] = "";
	int prefix = 0, mtu = 0;
	if (!*cmd_net)
		return;
	/* "up": a snapshot template's link, up with no address (silent: no IPv4, IPv6 off), so that a
	 * clone only sets its address instead of opening the device, which is slow under TCG */
	int up_only = !strcmp(cmd_net, "up");
	if (!up_only &&
	    (sscanf(cmd_net, "%31[0-9.]/%d,%31[0-9.],%d", ip, &prefix, gw, &mtu) != 4 || prefix < 1 || prefix > 32)) {
		console("matchlock.net=%s: not GUEST/PREFIX,GATEWAY,MTU or up", cmd_net);
		return;
	}
	for (long long end = now_ms() + 5000; access("/sys/class/net/eth0", F_OK) < 0; usleep(5000))
		if (now_ms() >= end) {
			console("eth0 did not appear within 5 s");
			return;
		}
	/* a clone of a template that brought the link up (this flag is in the snapshot's memory) skips
	 * what the template did: each step runs kernel code that TCG translates anew after a restore */
	static int link_up;
	int fd = link_up ? -2 : open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", O_WRONLY | O_CLOEXEC);
	if (fd == -1 || (fd >= 0 && write(fd, "1\n", 2) != 2))
		console("disable IPv6 on eth0: %s", strerror(errno));
	if (fd >= 0)
		close(fd);
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr = { 0 };
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "eth0");
	int ok = s >= 0;
	if (ok && !up_only && (ioctl(s, SIOCGIFMTU, &ifr) < 0 || ifr.ifr_mtu != mtu)) {
		ifr.ifr_mtu = mtu;
		ok = ioctl(s, SIOCSIFMTU, &ifr) == 0;
	}
	if (ok && !link_up)
		ok = ioctl(s, SIOCGIFFLAGS, &ifr) == 0 &&
		     (ifr.ifr_flags |= IFF_UP | IFF_RUNNING, ioctl(s, SIOCSIFFLAGS, &ifr) == 0);
	link_up |= ok;
	in_addr_t addr = inet_addr(ip), gwa = inet_addr(gw), mask = htonl(~0u << (32 - prefix));
	if (ok && !up_only)
		ok = set_addr(s, SIOCSIFADDR, "eth0", addr) == 0 && set_addr(s, SIOCSIFNETMASK, "eth0", mask) == 0;
	if (up_only && ok) {
		/* the template's link: up, no address */
	} else if (!ok) {
		console("configure eth0: %s", strerror(errno));
	} else {
		struct rtentry rt = { 0 };
		struct sockaddr_in *dst = (struct sockaddr_in *)&rt.rt_dst, *g = (struct sockaddr_in *)&rt.rt_gateway,
				   *m = (struct sockaddr_in *)&rt.rt_genmask;
		dst->sin_family = g->sin_family = m->sin_family = AF_INET;
		g->sin_addr.s_addr = gwa;
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		rt.rt_dev = "eth0";
		if (ioctl(s, SIOCADDRT, &rt) < 0)
			console("default route via %s: %s", gw, strerror(errno));
	}
	if (s >= 0)
		close(s);
}

static void apply_identity(void);

static void set_console(void)
{
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd < 0)
		return;
	dup2(fd, 0);
	dup2(fd, 1);
	dup2(fd, 2);
	if (fd > 2)
		close(fd);
}

void init_system(void)
{
	/* with fds 0-2 closed (no /dev/console in the initramfs) nothing may open a file before this */
	mkdir("/dev", 0755);
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0 && errno != EBUSY) {
		set_console();
		fatal("mount devtmpfs on /dev: %s", strerror(errno));
	}
	set_console();
	xmount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	xmount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	parse_cmdline();
	if (cmd_probe) {
		dprintf(1, "MATCHLOCK-PROBE-OK\n");
		reboot(RB_POWER_OFF);
	}
	load_modules();

	/* the root: overlay of the read-only base disk and a writable upper */
	wait_for("/dev/vda", 10000);
	mkdir("/mnt", 0755);
	xmount("/dev/vda", "/mnt/lower", cmd_rootfstype, MS_RDONLY,
	       strcmp(cmd_rootfstype, "ext4") ? NULL : "noload"); /* no journal replay on a shared image */
	if (access("/dev/vdb", F_OK) == 0)
		xmount("/dev/vdb", "/mnt/upperdisk", "ext4", 0, NULL);
	else
		xmount("tmpfs", "/mnt/upperdisk", "tmpfs", 0, "mode=0755");
	if ((mkdir("/mnt/upperdisk/upper", 0755) < 0 && errno != EEXIST) ||
	    (mkdir("/mnt/upperdisk/work", 0755) < 0 && errno != EEXIST))
		fatal("mkdir upper/work: %s", strerror(errno));
	xmount("overlay", "/mnt/root", "overlay", 0,
	       "lowerdir=/mnt/lower,upperdir=/mnt/upperdisk/upper,workdir=/mnt/upperdisk/work");

	/* switch root (the overlay is writable, so the mkdirs inside work) */
	xmount("/proc", "/mnt/root/proc", NULL, MS_MOVE, NULL);
	xmount("/sys", "/mnt/root/sys", NULL, MS_MOVE, NULL);
	xmount("/dev", "/mnt/root/dev", NULL, MS_MOVE, NULL);
	if (chdir("/mnt/root") < 0)
		fatal("chdir /mnt/root: %s", strerror(errno));
	if (mount(".", "/", NULL, MS_MOVE, NULL) < 0)
		fatal("move root: %s", strerror(errno));
	if (chroot(".") < 0 || chdir("/") < 0)
		fatal("chroot: %s", strerror(errno));

	/* not fatal from here: a missing feature shows up as an exec error, the VM stays usable */
	mkdir("/dev/pts", 0755);
	if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5") < 0)
		console("mount devpts: %s", strerror(errno));
	char link[64];
	ssize_t ll = readlink("/dev/ptmx", link, sizeof link - 1);
	if (ll < 0 || (link[ll] = 0, strcmp(link, "pts/ptmx") && strcmp(link, "/dev/pts/ptmx"))) {
		/* devtmpfs's /dev/ptmx may point at another devpts instance: make it ours */
		if (mount("/dev/pts/ptmx", "/dev/ptmx", NULL, MS_BIND, NULL) < 0)
			console("bind /dev/pts/ptmx: %s", strerror(errno));
	}
	mkdir("/dev/shm", 01777);
	if (mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
		console("mount /dev/shm: %s", strerror(errno));
	if (symlink("/proc/self/fd", "/dev/fd") < 0 && errno != EEXIST)
		console("symlink /dev/fd: %s", strerror(errno));
	const char *std[3] = { "/dev/stdin", "/dev/stdout", "/dev/stderr" };
	for (int i = 0; i < 3; i++) {
		char target[32];
		snprintf(target, sizeof target, "/proc/self/fd/%d", i);
		if (symlink(target, std[i]) < 0 && errno != EEXIST)
			console("symlink %s: %s", std[i], strerror(errno));
	}

	/* loopback; the kernel assigns 127.0.0.1 and ::1 when lo goes up */
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr = { 0 };
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
	if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0 ||
	    (ifr.ifr_flags |= IFF_UP | IFF_RUNNING, ioctl(s, SIOCSIFFLAGS, &ifr) < 0))
		console("bring up lo: %s", strerror(errno));
	if (s >= 0)
		close(s);

	apply_identity();
}

/* What makes this VM itself: network, hostname, clock, extra disks, host folders. At boot from the
 * kernel command line; in a clone restored from a snapshot from SET_IDENTITY (which reseeds first). */
static void apply_identity(void)
{
	configure_eth0();

	if (*cmd_hostname && sethostname(cmd_hostname, strlen(cmd_hostname)) < 0)
		console("sethostname: %s", strerror(errno));
	if (*cmd_time) {
		/* SECONDS, optionally with a decimal fraction */
		char *end;
		struct timespec ts = { .tv_sec = strtoll(cmd_time, &end, 10) };
		if (*end == '.') {
			long scale = 100000000;
			for (char *c = end + 1; *c >= '0' && *c <= '9' && scale; c++, scale /= 10)
				ts.tv_nsec += (*c - '0') * scale;
		}
		if (clock_settime(CLOCK_REALTIME, &ts) < 0)
			console("clock_settime: %s", strerror(errno));
	}

	/* extra disks (volumes, raw ext4 images) where the host says; not fatal: a command sees the error */
	for (int i = 0; i < n_disks; i++) {
		char dev[32], *path = strchr(cmd_disk[i], ':'), *mode = path ? strrchr(path + 1, ':') : NULL;
		if (!path || !mode || path - cmd_disk[i] >= 16) {
			console("matchlock.disk=%s: not vdX:PATH:ro|rw", cmd_disk[i]);
			continue;
		}
		*path++ = 0;
		*mode++ = 0;
		snprintf(dev, sizeof dev, "/dev/%.16s", cmd_disk[i]);
		wait_for(dev, 5000);
		if (mkdir_p(path, 0755, (uid_t)-1, (gid_t)-1) < 0 ||
		    mount(dev, path, "ext4", MS_NOSUID | MS_NODEV | (strcmp(mode, "ro") ? 0 : MS_RDONLY), NULL) < 0)
			console("mount %s on %s: %s", dev, path, strerror(errno));
	}
	n_disks = 0;

	if (*cmd_vfs)
		start_vfs(cmd_vfs, open_port("vfs"));
}

/*
 * SET_IDENTITY: a clone restored from a snapshot shares its template's memory, so its random state,
 * clock, hostname and addresses are the template's. First the host's entropy, credited to the
 * kernel's pool and forced into the CRNG (clones would otherwise share their first random bytes and
 * UUIDs), then the boot parameters this VM would have had. Payload: u32 n, n bytes of entropy, then
 * the parameters (matchlock.NAME=VALUE words). Answered by RESULT.
 */
void do_set_identity(uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct {
		int entropy_count;
		int buf_size;
		unsigned char buf[512];
	} ent;
	char params[4096];
	uint32_t n = len >= 4 ? get_u32(p) : UINT32_MAX;
	if (n > sizeof ent.buf || len - 4 < n || len - 4 - n >= sizeof params) {
		send_result(stream, EINVAL, "SET_IDENTITY: bad payload");
		return;
	}
	memcpy(ent.buf, p + 4, n);
	ent.entropy_count = (int)n * 8;
	ent.buf_size = (int)n;
	int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, RNDADDENTROPY, &ent) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0) {
		int err = errno;
		if (fd >= 0)
			close(fd);
		send_result(stream, err, "SET_IDENTITY: reseed the kernel's random generator");
		return;
	}
	close(fd);
	memset(&ent, 0, sizeof ent);
	memcpy(params, p + 4 + n, len - 4 - n);
	params[len - 4 - n] = 0;
	cmd_hostname[0] = cmd_time[0] = cmd_net[0] = cmd_vfs[0] = 0;
	parse_params(params);
	apply_identity();
	send_result(stream, 0, "");
}

/* The virtio-serial port with this name ("agent", "vfs"); ports are announced asynchronously, so
 * wait for it. */
int open_port(const char *want)
{
	for (long long end = now_ms() + 10000; now_ms() < end; usleep(5000)) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *de;
		while (d && (de = readdir(d))) {
			char path[512], name[64] = "";
			if (de->d_name[0] == '.')
				continue;
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
			int fd = open(path, O_RDONLY | O_CLOEXEC);
			ssize_t n = fd < 0 ? -1 : read(fd, name, sizeof name - 1);
			if (fd >= 0)
				close(fd);
			if (n <= 0)
				continue;
			name[n] = 0;
			name[strcspn(name, "\n")] = 0;
			if (strcmp(name, want))
				continue;
			snprintf(path, sizeof path, "/dev/%s", de->d_name);
			int port = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
			if (port >= 0) {
				closedir(d);
				return port;
			}
		}
		if (d)
			closedir(d);
	}
	fatal("virtio-serial port \"%s\" not found", want);
	return -1;
}
