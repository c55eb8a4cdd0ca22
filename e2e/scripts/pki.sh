# shellcheck shell=bash
# Certificates and keys of the e2e cluster ("Kubernetes the hard way" layout, ECDSA P-256 so a
# fresh set takes a fraction of a second). Sourced by cluster-up.sh after common.sh.

# key in PKCS#8: Go and rustls (kube-rs in the tests reads the admin key) both accept it.
pki_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

pki_ca() { # [name]
  local ca=${1:-ca}
  pki_key "$PKI/$ca.key"
  openssl req -x509 -new -key "$PKI/$ca.key" -days 3650 -subj "/CN=graceful-e2e-$ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$PKI/$ca.crt" 2>/dev/null
}

pki_cert() { # name subject extendedKeyUsage [subjectAltName] [ca]
  local name=$1 subject=$2 eku=$3 san=${4:-} ca=${5:-ca}
  pki_key "$PKI/$name.key"
  openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -z $san ]] || echo "subjectAltName=$san"
  } > "$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 365 -extfile "$PKI/$name.ext" \
    -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

# A kubeconfig for one client certificate, certificates embedded so the file stands alone.
pki_kubeconfig() { # file cert-name server
  local file=$1 name=$2 server=$3
  cat > "$file" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: graceful-e2e
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$name.crt")
    client-key-data: $(base64 -w0 < "$PKI/$name.key")
contexts:
- name: graceful-e2e
  context: {cluster: graceful-e2e, user: $name}
current-context: graceful-e2e
KUBECONFIG
  chmod 600 "$file"
}

# The API server's identity towards admission webhooks: a client certificate from a CA of its
# own (the webhook trusts this CA alone, not every client of the cluster CA), given to the
# apiserver by an AdmissionConfiguration, as a platform team configures it (docs/security.md).
pki_webhook_client() {
  pki_ca webhook-client-ca
  pki_cert webhook-client "/CN=kube-apiserver-webhook-client" clientAuth "" webhook-client-ca
  cat > "$STATE/webhook-client.kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
users:
- name: "*"
  user:
    client-certificate: $PKI/webhook-client.crt
    client-key: $PKI/webhook-client.key
KUBECONFIG
  chmod 600 "$STATE/webhook-client.kubeconfig"
  cat > "$STATE/admission.yaml" <<YAML
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: MutatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $STATE/webhook-client.kubeconfig
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $STATE/webhook-client.kubeconfig
YAML
}

pki_all() {
  rm -rf "$PKI" && mkdir -p "$PKI" && chmod 700 "$PKI"
  pki_ca
  # kube-rs in a pod dials the first service IP and checks it against this list.
  pki_cert apiserver "/CN=kube-apiserver" serverAuth \
    "IP:127.0.0.1,IP:$NODE_IP,IP:$SERVICE_IP_APISERVER,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
  # logs, exec and port-forward: the kubelet authorizes the apiserver by this identity.
  pki_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  pki_cert admin "/O=system:masters/CN=graceful-admin" clientAuth
  pki_cert controller-manager "/CN=system:kube-controller-manager" clientAuth
  pki_cert scheduler "/CN=system:kube-scheduler" clientAuth
  pki_cert kube-proxy "/CN=system:kube-proxy" clientAuth
  # The Node authorizer only accepts a kubelet whose CN is exactly system:node:<node name>.
  pki_cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  pki_cert kubelet-serving "/CN=$NODE_NAME" serverAuth "IP:$NODE_IP,DNS:$NODE_NAME"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key" 2>/dev/null
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"

  pki_kubeconfig "$KUBECONFIG_ADMIN" admin "$APISERVER_URL"
  pki_kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager "$APISERVER_URL"
  pki_kubeconfig "$STATE/scheduler.kubeconfig" scheduler "$APISERVER_URL"
  pki_kubeconfig "$STATE/kube-proxy.kubeconfig" kube-proxy "$APISERVER_URL"
  pki_kubeconfig "$STATE/kubelet.kubeconfig" kubelet "$APISERVER_URL"
  pki_webhook_client
}
