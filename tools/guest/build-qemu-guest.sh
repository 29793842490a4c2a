#!/usr/bin/env bash
# tools/guest/build-qemu-guest.sh DIR: the Linux test guest for the QEMU
# engine, in DIR: vmlinuz (Debian's kernel) and initramfs.cpio.gz.
#
# Everything comes from Debian packages: the kernel is linux-image-amd64
# (fetched with apt-get download and unpacked with dpkg-deb; nothing is
# installed), the userland is busybox-static, e2fsprogs' mke2fs and e2fsck
# (with the libraries they link) and csv-writer (tools/guest/writer.c,
# built static with gcc).
#
# The guest's /init loads virtio-pci, virtio-blk and ext4, then on
# /dev/vda (the VM's disk, served by csv): makes an ext4 filesystem if
# there is none; otherwise mounts it once (the journal replays), unmounts
# it and runs `e2fsck -fn`, printing "fsck clean" or "fsck ERRORS". It
# then mounts the disk and runs csv-writer on /mnt/records: checksummed
# 512-byte records with fdatasync, heartbeats "hb N" on /dev/ttyS1 (the
# engine turns that port into UDP datagrams to the host), a full reread
# and check every 200 records ("verify ok N"). Markers on the console
# (ttyS0): CSV-GUEST-UP, CSV-GUEST-MKFS, CSV-GUEST-MOUNTED. A root shell
# runs on the console beside it (csvctl vm console --interactive).
#
# The guest runs qemu-guest-agent (Debian's, unpacked from its package
# like the kernel) on its virtio-serial port, so a snapshot of its volume
# freezes its filesystems; csv.agent=0 on the command line leaves it out.
#
# The kernel command line may carry csv.mode=idle (no disk workload:
# boot, print the markers, send "hb idle" heartbeats) or csv.mode=fio
# (the benchmark, with initramfs-fio.cpio.gz: Debian's fio with its
# libraries on /dev/vda, O_DIRECT with libaio: a 256 MiB sequential fill,
# then 4 KiB random reads and writes at queue depth 32 and 1 MiB
# sequential reads and writes at depth 8, 8 s each, each job's terse
# result line sent as "fio LINE", then "CSV-GUEST-FIO-DONE" and power off).
#
# It also makes bootable.raw: a 64 MiB disk firmware boots by itself, as a
# Hyper-V VM boots its VHD: one FAT partition holding the same kernel and
# initramfs with SYSLINUX for both firmwares (UEFI: \EFI\BOOT\BOOTX64.EFI,
# the removable-media path OVMF tries; BIOS: syslinux's MBR and boot
# sector) and a syslinux.cfg booting them with csv.mode=idle (the disk is
# the boot disk: the guest must not make a filesystem on it). `csvctl vhd
# convert` turns it into a VHD. Built without mounting anything (mtools,
# syslinux --install on the image).
set -euo pipefail
out=${1:?usage: tools/guest/build-qemu-guest.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/work"
rm -rf "$work"
mkdir -p "$work/deb" "$work/root"
for tool in busybox mke2fs e2fsck gcc objcopy syslinux mcopy mkfs.vfat sfdisk; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed (tools/setup.sh --qemu-system)" >&2; exit 1; }
done
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || { echo "apt does not know linux-image-amd64" >&2; exit 1; }
if ! ls "$out"/"$pkg"_*.deb >/dev/null 2>&1; then
  (cd "$out" && apt-get download "$pkg")
fi
dpkg-deb -x "$out"/"$pkg"_*.deb "$work/deb"
if ! ls "$out"/qemu-guest-agent_*.deb >/dev/null 2>&1; then
  (cd "$out" && apt-get download qemu-guest-agent)
fi
mkdir -p "$work/qga"
dpkg-deb -x "$out"/qemu-guest-agent_*.deb "$work/qga"
cp "$work"/deb/boot/vmlinuz-* "$out/vmlinuz"
kver=$(ls "$work/deb/lib/modules")
mods="$work/deb/lib/modules/$kver"
r="$work/root"
mkdir -p "$r/bin" "$r/sbin" "$r/dev" "$r/proc" "$r/sys" "$r/mnt" "$r/tmp" "$r/lib/modules" "$r/etc"
cp "$(command -v busybox)" "$r/bin/busybox"
gcc -static -O2 -Wall -o "$r/bin/csv-writer" "$here/writer.c"
# mke2fs, e2fsck and qemu-ga with their shared libraries and loader.
cp "$work/qga/usr/sbin/qemu-ga" "$r/sbin/qemu-ga"
for b in mke2fs e2fsck "$r/sbin/qemu-ga"; do
  case "$b" in /*) bin=$b ;; *) bin=$(command -v "$b"); cp "$bin" "$r/sbin/$b" ;; esac
  ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | while read -r lib; do
    mkdir -p "$r$(dirname "$lib")"
    cp -L "$lib" "$r$lib"
  done
done
cp /etc/mke2fs.conf "$r/etc/mke2fs.conf"
# The modules /init loads, each after what it depends on (the
# "depends=" of its .modinfo: the package has no modules.dep, which
# depmod makes at install time).
want="virtio_pci virtio_blk virtio_console virtio_net crc32c_generic ext4"
order=" "
add() {
  local name=$1 f d
  case "$order" in *" $name "*) return ;; esac
  f=$(find "$mods" -name "$name.ko*" | head -n1)
  [ -n "$f" ] || { echo "module $name is built in or missing; skipped" >&2; return; }
  case "$f" in
    *.xz) xz -dc "$f" > "$r/lib/modules/$name.ko" ;;
    *.zst) zstd -dcq "$f" > "$r/lib/modules/$name.ko" ;;
    *) cp "$f" "$r/lib/modules/$name.ko" ;;
  esac
  for d in $(objcopy -O binary --only-section=.modinfo "$r/lib/modules/$name.ko" /dev/stdout | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do
    add "$d"
  done
  order="$order$name "
}
for m in $want; do add "$m"; done
echo $order > "$r/lib/modules/order"
cat > "$r/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo CSV-GUEST-UP; echo CSV-GUEST-UP > /dev/ttyS1 2>/dev/null
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done
# What the host must hear goes to the console and to the heartbeat port.
say() { echo "$1"; echo "$1" > /dev/ttyS1 2>/dev/null; }
for n in /sys/class/net/eth*; do
  [ -e "$n/address" ] && say "CSV-GUEST-MAC $(cat "$n/address")"
done
mode=disk
for a in $(cat /proc/cmdline); do case "$a" in csv.mode=*) mode=${a#csv.mode=} ;; esac; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
if [ "$mode" = fio ] && [ -b /dev/vda ]; then
  echo CSV-GUEST-FIO; echo CSV-GUEST-FIO > /dev/ttyS1 2>/dev/null
  o="--filename=/dev/vda --direct=1 --ioengine=libaio --size=256M"
  fio --name=fill $o --rw=write --bs=1M --iodepth=8 >/dev/null 2>&1
  for job in "randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8"; do
    set -- $job
    fio --minimal --name="$1-$2" $o --rw="$1" --bs="$2" --iodepth="$3" --time_based --runtime=8 2>&1 |
      while read -r l; do echo "fio $l"; echo "fio $l" > /dev/ttyS1 2>/dev/null; done
  done
  echo CSV-GUEST-FIO-DONE; echo CSV-GUEST-FIO-DONE > /dev/ttyS1 2>/dev/null
  sync; poweroff -f
fi
# A root shell on the serial console (csvctl vm console --interactive),
# beside whatever the guest runs (not during the benchmark).
setsid sh -c 'exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1' &
if [ "$mode" = idle ] || [ ! -b /dev/vda ]; then
  [ -b /dev/vda ] || echo CSV-GUEST-NO-DISK
  echo CSV-GUEST-IDLE; echo CSV-GUEST-IDLE > /dev/ttyS1 2>/dev/null
  while true; do echo "hb idle" > /dev/ttyS1 2>/dev/null; sleep 0.1; done
fi
if mount -t ext4 /dev/vda /mnt 2>/dev/null; then
  umount /mnt
  if /sbin/e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1; then
    say "fsck clean"
  else
    say "fsck ERRORS"; cat /tmp/fsck.log
  fi
else
  /sbin/mke2fs -q -F -t ext4 /dev/vda && say CSV-GUEST-MKFS
fi
mount -t ext4 /dev/vda /mnt && say CSV-GUEST-MOUNTED
agent=1
for a in $(cat /proc/cmdline); do case "$a" in csv.agent=0) agent=0 ;; esac; done
if [ $agent = 1 ]; then
  for n in /sys/class/virtio-ports/*/name; do
    if [ "$(cat "$n" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
      port=/dev/$(basename "$(dirname "$n")")
      mkdir -p /var/run /usr/local/var/run
      /sbin/qemu-ga -d -m virtio-serial -p "$port" && say CSV-GUEST-AGENT
    fi
  done
fi
exec /bin/csv-writer /mnt/records /dev/ttyS1 50 100
INIT
chmod +x "$r/init"
(cd "$r" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -6) > "$out/initramfs.cpio.gz"
# The benchmark's initramfs: the same with fio and every library it links.
if command -v fio >/dev/null; then
  cp "$(command -v fio)" "$r/bin/fio"
  ldd "$(command -v fio)" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | while read -r lib; do
    mkdir -p "$r$(dirname "$lib")"
    cp -L "$lib" "$r$lib"
  done
  (cd "$r" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$out/initramfs-fio.cpio.gz"
fi
# The firmware-bootable disk.
part="$work/part.img"
rm -f "$part"
mkfs.vfat -C -n CSVBOOT "$part" $(( (64 - 1) * 1024 )) >/dev/null
cat > "$work/syslinux.cfg" <<CFG
DEFAULT linux
TIMEOUT 0
PROMPT 0
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.gz console=ttyS0 quiet csv.mode=idle
CFG
mcopy -i "$part" "$out/vmlinuz" ::vmlinuz
mcopy -i "$part" "$out/initramfs.cpio.gz" ::initrd.gz
mcopy -i "$part" "$work/syslinux.cfg" ::syslinux.cfg
mmd -i "$part" ::EFI ::EFI/BOOT
mcopy -i "$part" /usr/lib/SYSLINUX.EFI/efi64/syslinux.efi ::EFI/BOOT/BOOTX64.EFI
mcopy -i "$part" /usr/lib/syslinux/modules/efi64/ldlinux.e64 ::EFI/BOOT/ldlinux.e64
sed 's|KERNEL vmlinuz|KERNEL /vmlinuz|; s|initrd=initrd.gz|initrd=/initrd.gz|' "$work/syslinux.cfg" > "$work/efi.cfg"
mcopy -i "$part" "$work/efi.cfg" ::EFI/BOOT/syslinux.cfg
syslinux --install "$part"
disk="$out/bootable.raw"
rm -f "$disk"
truncate -s 64M "$disk"
echo 'start=2048, type=6, bootable' | sfdisk -q "$disk" >/dev/null
dd if="$part" of="$disk" bs=1M seek=1 conv=notrunc status=none
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$disk" bs=440 count=1 conv=notrunc status=none
rm -rf "$work"
echo "kernel $kver ($pkg): $out/vmlinuz, $out/initramfs.cpio.gz; modules:$order"
