#!/usr/bin/env bash
# tools/guest/build-linux.sh DIR: a Debian kernel and a busybox initramfs for
# csv-vmm's Linux boot, in DIR (bzImage, initramfs.cpio.gz).
#
# The kernel is Debian's linux-image-amd64 (fetched with apt-get download,
# unpacked with dpkg-deb, nothing installed); the initramfs holds
# busybox-static and the kernel's virtio modules (decompressed: busybox's
# insmod reads plain .ko files). Its /init mounts /proc, /sys and /dev,
# prints CSV-LINUX-UP on the console, loads virtio_mmio with the device
# csv-vmm places at 0xd0000000 (IRQ 5; the Debian kernel builds virtio-mmio
# as a module, so the kernel command line cannot name it), makes an ext2
# filesystem on /dev/vda, mounts it, writes /csv-linux.txt, prints
# CSV-LINUX-DISK-OK, and powers off.
set -euo pipefail
out=${1:?usage: tools/guest/build-linux.sh DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/work"
rm -rf "$work"
mkdir -p "$work/deb" "$work/root"
command -v busybox >/dev/null || { echo "busybox-static is not installed (tools/setup.sh)" >&2; exit 1; }
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || { echo "apt does not know linux-image-amd64" >&2; exit 1; }
if ! ls "$out"/"$pkg"_*.deb >/dev/null 2>&1; then
  (cd "$out" && apt-get download "$pkg")
fi
dpkg-deb -x "$out"/"$pkg"_*.deb "$work/deb"
cp "$work"/deb/boot/vmlinuz-* "$out/bzImage"
kver=$(ls "$work/deb/lib/modules")
r="$work/root"
mkdir -p "$r/bin" "$r/dev" "$r/proc" "$r/sys" "$r/mnt" "$r/lib/modules"
cp "$(command -v busybox)" "$r/bin/busybox"
for m in virtio virtio_ring virtio_mmio virtio_blk; do
  f=$(find "$work/deb/lib/modules/$kver" -name "$m.ko*" | head -n1)
  [ -n "$f" ] || continue
  case "$f" in
    *.xz) xz -dc "$f" > "$r/lib/modules/$m.ko" ;;
    *.zst) zstd -dcq "$f" > "$r/lib/modules/$m.ko" ;;
    *) cp "$f" "$r/lib/modules/$m.ko" ;;
  esac
done
cat > "$r/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo CSV-LINUX-UP
for m in virtio virtio_ring virtio_mmio virtio_blk; do
  if [ "$m" = virtio_mmio ]; then
    insmod /lib/modules/$m.ko device=4K@0xd0000000:5 2>/dev/null
  else
    insmod /lib/modules/$m.ko 2>/dev/null
  fi
done
sleep 1
if [ -b /dev/vda ]; then
  # An ext2 filesystem on the VHD, a file on it: the host reads it back
  # (docs/VMM.md shows how).
  mke2fs -F /dev/vda >/dev/null
  mount -t ext2 /dev/vda /mnt || mount -t ext4 /dev/vda /mnt
  echo "CSV-LINUX-WROTE-THIS $(date +%s)" > /mnt/csv-linux.txt
  umount /mnt
  sync
  echo CSV-LINUX-DISK-OK
else
  echo CSV-LINUX-NO-DISK
fi
poweroff -f
INIT
chmod +x "$r/init"
(cd "$r" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -9) > "$out/initramfs.cpio.gz"
rm -rf "$work"
echo "kernel $kver: $out/bzImage, $out/initramfs.cpio.gz"
